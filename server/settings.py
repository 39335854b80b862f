"""Server settings: one pydantic-settings class, read from ``HPR_*`` environment variables and CLI flags.

Every field is also a CLI flag of ``hpr-serve`` (``max_batch_size`` → ``--max-batch-size``); flags win over the
environment. List fields (``adapter``, ``api_key``, ``cors_origin``) repeat on the command line and are
comma-separated (or a JSON list) in the environment. The app reaches the settings through
:func:`server.runtime.get_settings`; nothing reads them at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hpr.edit_spec import AdapterDefaults
from hpr.model import EMBEDDED_MODEL_ID
from server.engine.types import DEFAULT_PREFILL_CHUNK, MAX_GRAPHS

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
StrList = Annotated[list[str], NoDecode]


def _split_list(value: Any) -> Any:
    """Env values arrive as one string: accept a JSON list or comma-separated items."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class ServerSettings(BaseSettings):
    """Everything ``hpr-serve`` can be told at startup (env prefix ``HPR_``)."""

    model_config = SettingsConfigDict(env_prefix="HPR_", extra="ignore", env_ignore_empty=True, frozen=True)

    backend: Literal["hf", "vllm"] = Field(
        default="hf",
        description="Engine: hf (our continuous-batching engine on transformers; every model family, the exactness "
        "reference) or vllm (vLLM's engine with the edits inside its forward; needs vLLM installed). "
        "docs/server.md, 'Backends'.",
    )
    vllm_arg: StrList = Field(
        default_factory=list,
        description="With --backend vllm: a vLLM engine argument as KEY=VALUE (the value as JSON when it parses), "
        "e.g. max_num_seqs=64, enforce_eager=true, tensor_parallel_size=2.",
    )
    vllm_config: Path | None = Field(
        default=None, description="With --backend vllm: a JSON file of vLLM engine arguments (--vllm-arg wins)."
    )
    model: str = Field(
        default=EMBEDDED_MODEL_ID,
        description="Base model: a Hugging Face directory, a hub id, a .gguf file, or the embedded default.",
    )
    adapter: StrList = Field(
        default_factory=list,
        description="HPR adapter to load as NAME=PATH (or PATH: the name is the directory name), optionally with "
        "its defaults under that name: NAME=PATH:alpha=2:scope=all:tokens=all (what a request that sends no hpr "
        "field gets: an evaluation harness, say). Our checkpoint format or the seed's. More can be loaded at run "
        "time under --adapter-root.",
    )
    adapter_root: Path | None = Field(
        default=None,
        description="Directory that adapters loaded at run time (POST /v1/adapters) must be inside. Unset: the "
        "adapter endpoints are off. Needs --admin-key.",
    )
    admin_key: str | None = Field(
        default=None,
        description="Bearer key of the adapter endpoints (POST /v1/adapters, DELETE /v1/adapters/NAME); distinct "
        "from the --api-key keys, which do not open them.",
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    max_batch_size: int = Field(default=32, ge=1, description="Most sequences decoded together in one forward pass.")
    max_queue: int = Field(default=256, ge=0, description="Most requests waiting for a batch slot; past it: 429.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="Context length (prompt + generated tokens); default: the model's own."
    )
    quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: weight-only int8 linear layers through torchao (pip install 'hpr-serve[int8]'); "
        "activations and edits keep the dtype. Faster at batch 1 on CPU (docs/benchmarks.md).",
    )
    prefill_chunk: int = Field(
        default=DEFAULT_PREFILL_CHUNK,
        ge=0,
        description="Prompt tokens per prefill forward (summed over requests prefilled together); a longer prefill "
        "runs in chunks between decode steps, so running streams keep a bounded inter-token latency. 0: whole "
        "prompts.",
    )
    mixed_prefill: bool = Field(
        default=True,
        description="Run each prefill chunk in the same forward as the running streams' decode step (the families "
        "with Llama's model loop and SDPA attention, no sliding window: docs/server.md 'Supported models'), so the "
        "weights are read once for both. --no-mixed-prefill: a forward each.",
    )
    max_step_tokens: int = Field(
        default=0,
        ge=0,
        description="Tokens one engine step may process: the running streams' one each plus a prefill chunk's prompt "
        "tokens (vLLM's max_num_batched_tokens). A chunk takes what the running rows leave, at least one column per "
        "newcomer, at most --prefill-chunk; on a CPU this bounds the running streams' pause while newcomers arrive, "
        "at the newcomers' time to first token (docs/benchmarks.md). 0: no budget, --prefill-chunk alone.",
    )
    compile_decode: bool = Field(
        default=False,
        description="Decode through one torch.compile'd graph with a static-shaped KV cache and the edits inline "
        "(the families with Llama's model loop and SDPA attention, no sliding window; others are refused at "
        "startup). 1.15-1.36x the eager decode at batch 1 and 1.85x at 32 rows of "
        "64-token requests on the development CPU (no faster at 32 rows of ~600-token streams), but every stream "
        "waits while a new batch shape or edit set compiles (a minute or more there): off by default "
        "(docs/benchmarks.md).",
    )
    compile_max_graphs: int = Field(
        default=MAX_GRAPHS,
        ge=1,
        description="With --compile-decode: graphs compiled at most (one per set of edited layers and adapters, with "
        "edit statistics or not, one row or more); steps that would need another run eagerly. On a CPU each graph "
        "holds a packed copy of the weights: 0.65-0.8 GB for SmolLM2 in fp32.",
    )
    compile_warmup: bool = Field(
        default=False,
        description="With --compile-decode: compile, before /health is ok, the graphs that the base model and each "
        "loaded adapter's default edit need, one row and several (docs/server.md). Takes about a minute per graph "
        "on the development CPU at startup instead of at the first requests.",
    )
    compile_autotune: bool = Field(
        default=False,
        description="With --compile-decode: let inductor benchmark its matmul kernels against the library's when "
        "it compiles (torch.compile mode max-autotune-no-cudagraphs). On the development CPU 1.09x the decode "
        "speed at batch 1, for about twice the compile time (docs/benchmarks.md).",
    )
    api_key: StrList = Field(
        default_factory=list, description="Accepted API key (Bearer token). Without any key, no authentication."
    )
    api_key_file: Path | None = Field(
        default=None, description="File with one accepted API key per line ('#' comments)."
    )
    device: str = Field(default="auto", description="Torch device: auto, cpu, cuda, cuda:1, ...")
    dtype: str = Field(
        default="auto", description="Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
    )
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch CPU threads (torch.set_num_threads); default: torch's choice. On a shared, busy CPU "
        "fewer threads than cores can be much faster.",
    )
    malloc_tuning: bool = Field(
        default=True,
        description="On glibc: keep freed memory in the process, in one arena (mallopt) so the KV cache, rebuilt "
        "whenever requests join or leave the batch, reuses it instead of page-faulting fresh memory from the OS "
        "(docs/server.md). Skipped when MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or MALLOC_ARENA_MAX is set. "
        "--no-malloc-tuning: glibc's defaults.",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model id shown in /v1/models and accepted as `model` (default: derived from --model).",
    )
    cors_origin: StrList = Field(
        default_factory=list,
        description="Allowed CORS origin (e.g. https://app.example or *). Off if unset.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest accepted request body; past it: 413."
    )
    drain_timeout: float = Field(default=30.0, ge=0, description="Seconds running requests get to finish on shutdown.")
    playground: bool = Field(
        default=True, description="Serve the A/B playground page at /playground (--no-playground: off)."
    )
    docs: bool = Field(
        default=True,
        description="Serve the API docs (/docs, /redoc, /openapi.json; they need the API key when one is set). "
        "--no-docs: off.",
    )
    log_level: LogLevel = Field(default="info", description="Log level of the server and uvicorn.")

    @field_validator("adapter", "api_key", "cors_origin", "vllm_arg", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_adapters(self) -> ServerSettings:
        self.adapters()  # raises ValueError on a bad or duplicate NAME=PATH, or a bad default
        if self.adapter_root is not None:
            if not self.adapter_root.expanduser().is_dir():
                raise ValueError(f"--adapter-root {self.adapter_root}: not a directory")
            if not self.admin_key:
                raise ValueError("--adapter-root needs --admin-key (the key of the adapter endpoints)")
        if self.admin_key is not None and self.admin_key in self.api_key:
            raise ValueError("--admin-key must differ from every --api-key")
        if self.compile_warmup and not self.compile_decode:
            raise ValueError("--compile-warmup warms up the compiled decode step: it needs --compile-decode")
        if self.max_step_tokens and self.max_step_tokens <= self.max_batch_size:
            raise ValueError(
                f"--max-step-tokens {self.max_step_tokens} must exceed --max-batch-size {self.max_batch_size}: the "
                "running rows alone would take the whole budget and no prefill chunk would fit"
            )
        if self.backend == "vllm":
            hf_only = [
                flag
                for flag, on in (
                    ("--compile-decode", self.compile_decode),
                    ("--quantization int8", self.quantization != "none"),
                    ("--max-step-tokens", bool(self.max_step_tokens)),
                )
                if on
            ]
            if hf_only:
                raise ValueError(
                    f"{', '.join(hf_only)}: options of --backend hf; with --backend vllm pass vLLM's own through "
                    "--vllm-arg (e.g. max_num_batched_tokens=512)"
                )
        elif self.vllm_arg or self.vllm_config is not None:
            raise ValueError("--vllm-arg and --vllm-config need --backend vllm")
        if self.compile_autotune and not self.compile_decode:
            raise ValueError("--compile-autotune tunes the compiled decode step: it needs --compile-decode")
        return self

    def adapter_paths(self) -> dict[str, Path]:
        """``--adapter`` values as ``{name: directory}``, in the order given."""
        return {name: path for name, (path, _) in self.adapters().items()}

    def adapters(self) -> dict[str, tuple[Path, AdapterDefaults]]:
        """``--adapter NAME=DIR[:alpha=A][:scope=S][:tokens=N]`` values as ``{name: (directory, defaults)}``."""
        out: dict[str, tuple[Path, AdapterDefaults]] = {}
        for item in self.adapter:
            name, sep, rest = item.partition("=")
            if not sep or ":" in name:  # PATH[:fields]: the name is the directory's
                path, _, fields = item.partition(":")
                name = Path(path.strip()).name
            else:
                path, _, fields = rest.partition(":")
            name, path = name.strip(), path.strip()
            if not name or not path:
                raise ValueError(f"--adapter {item!r}: expected NAME=PATH[:alpha=A][:scope=S][:tokens=N]")
            if name in out:
                raise ValueError(f"--adapter {item!r}: the name {name!r} is used twice")
            out[name] = (Path(path).expanduser(), AdapterDefaults.parse(fields, f"--adapter {item!r}"))
        return out

    def api_keys(self) -> frozenset[str]:
        """The accepted keys: ``--api-key`` values plus the lines of ``--api-key-file`` (read when called)."""
        keys = {key for key in self.api_key if key}
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"--api-key-file {self.api_key_file}: {exc}") from exc
            keys.update(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
        return frozenset(keys)
