"""vLLM's engine arguments for ``--backend vllm``: our settings first, then ``--vllm-config`` FILE, then each
``--vllm-arg KEY=VALUE`` (the later wins). Unknown keys are an error before anything loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from hpr.errors import ModelLoadError
from hpr.model import resolve_device, resolve_dtype
from server.settings import ServerSettings

WORKER_EXTENSION = "server.vllm_backend.worker.HPRWorkerExtension"
CPU_KV_CACHE_BYTES = 2 * 1024**3  # SmolLM2-135M in fp32: ~45k tokens


def parse_vllm_arg(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key with ``-`` as ``_``, the value as JSON when it parses — numbers, booleans, objects —
    else the string)."""
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("--").replace("-", "_")
    if not sep or not key:
        raise ValueError(f"--vllm-arg {item!r}: expected KEY=VALUE, e.g. max_num_seqs=64")
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key, value


def read_vllm_config(path: Path) -> dict[str, Any]:
    """``--vllm-config``: a JSON object of engine arguments."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"--vllm-config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"--vllm-config {path}: expected a JSON object of vLLM engine arguments")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def user_engine_args(settings: ServerSettings) -> dict[str, Any]:
    """The engine arguments the user gave (``--vllm-config``, then ``--vllm-arg``), keys checked against vLLM's."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    given: dict[str, Any] = {}
    if settings.vllm_config is not None:
        given.update(read_vllm_config(settings.vllm_config))
    for item in settings.vllm_arg:
        key, value = parse_vllm_arg(item)
        given[key] = value
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ModelLoadError(
            f"unknown vLLM engine argument(s) {unknown} (--vllm-arg / --vllm-config): see vLLM's engine arguments"
        )
    if "worker_extension_cls" in given:
        raise ModelLoadError("--vllm-arg worker_extension_cls is hpr-serve's own (it carries the edits)")
    return given


EDIT_OPS = ["hpr::edit_residual_", "hpr::edit_hidden_"]


def cuda_compilation_config() -> dict[str, Any]:
    """On a GPU: the edit ops split vLLM's compiled graph as attention does, so they run eagerly between piecewise
    CUDA graphs (a captured graph would replay the first step's edit plan forever); full CUDA graphs are off.
    Untested here (no GPU on the development machines): bench/gpu_check.sh checks it on a CUDA host."""
    from vllm.config import CompilationConfig

    attention = list(CompilationConfig._attention_ops)
    kv_updates = ["vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update"]
    return {"cudagraph_mode": "PIECEWISE", "splitting_ops": [*attention, *kv_updates, *EDIT_OPS]}


def engine_args_for(settings: ServerSettings, source: str, model_id: str) -> Any:
    """The ``AsyncEngineArgs`` that start vLLM on ``source`` with the edit machinery."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    device = resolve_device(settings.device)
    dtype = str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")
    args: dict[str, Any] = {
        "model": source,
        "tokenizer": source,
        "served_model_name": [settings.served_model_name or model_id],
        "dtype": dtype,
        "max_num_seqs": settings.max_batch_size,
        "worker_extension_cls": WORKER_EXTENSION,
        "disable_log_stats": True,
        # llguidance, the grammar library the hf engine uses: the same grammar, and a tenth of xgrammar's cost per
        # token on strings with maxLength (server/serving/structured.py)
        "structured_outputs_config": {"backend": "guidance"},
    }
    if device.type == "cpu":
        # On a CPU vLLM reserves gpu_memory_utilization (0.92) of the machine's memory and refuses to start when
        # that much is not free; a fixed KV cache budget starts anywhere (tokens: budget / per-token KV bytes).
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if device.type == "cuda":
        args["compilation_config"] = cuda_compilation_config()
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    args.update(user_engine_args(settings))
    try:
        if isinstance(args["structured_outputs_config"], dict):  # AsyncEngineArgs takes only the dataclass here
            from vllm.config import StructuredOutputsConfig

            args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
        return AsyncEngineArgs(**args)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"vLLM engine arguments {args}: {exc}") from exc
