"""vLLM general plugin (entry point ``vllm.general_plugins``): registers our instrumented model classes.

vLLM loads general plugins in every process it starts (the API process, the engine core, each worker). This one
does nothing unless ``HPR_VLLM_EDITS=1`` is set in the environment (the vllm backend sets it before it starts vLLM,
and the processes vLLM starts inherit it), so installing hpr-serve never changes a plain ``vllm serve``.

When on, each supported architecture is registered again (``ModelRegistry.register_model``, vLLM's out-of-tree
model registration) as a subclass of vLLM's own class that (1) ends every decoder layer with the edit op of
:mod:`server.vllm_backend.worker`, and (2) builds the step's edit plan in its outer ``forward``, which runs eagerly
before the compiled inner model. No vLLM file is patched: the layers' weights, names and kernels are vLLM's.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from torch import Tensor, nn

ENV_FLAG = "HPR_VLLM_EDITS"

# Architectures whose vLLM decoder layers return (hidden, residual) and live at ``model.model.layers``, as tested by
# tests/server/vllm_backend (vLLM's module and class of each).
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("vllm.model_executor.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma2ForCausalLM": ("vllm.model_executor.models.gemma2", "Gemma2ForCausalLM"),
}

_classes: dict[str, type[nn.Module]] = {}


def register() -> None:
    """The entry point: register the instrumented classes, when the vllm backend asked for them."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm import ModelRegistry

    import server.vllm_backend.worker  # noqa: F401  (registers the torch.ops.hpr ops in this process)

    for arch in SUPPORTED:
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")


def __getattr__(name: str) -> Any:
    """``server.vllm_backend.plugin.<Arch>``: the instrumented subclass, built on first use (vLLM imports lazily)."""
    if name not in SUPPORTED:
        raise AttributeError(name)
    if name not in _classes:
        module, cls_name = SUPPORTED[name]
        _classes[name] = instrumented_class(getattr(importlib.import_module(module), cls_name))
    return _classes[name]


def instrumented_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of vLLM's ``base`` (a ``*ForCausalLM``) whose decoder layers end with the edit op."""
    from server.vllm_backend.worker import STATE

    class Instrumented(base):  # type: ignore[misc, valid-type]
        hpr_instrumented = True

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:  # the signature vLLM inspects
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            for index, layer in enumerate(self.model.layers):
                _end_with_edit(layer, index)

        def forward(self, input_ids: Tensor | None, positions: Tensor, *args: Any, **kwargs: Any) -> Any:
            STATE.begin_step(positions)  # eager, every step: which token gets which edit
            return super().forward(input_ids, positions, *args, **kwargs)

    Instrumented.__name__ = Instrumented.__qualname__ = base.__name__
    return Instrumented


def _end_with_edit(layer: nn.Module, index: int) -> None:
    """Make ``layer``'s forward end with the edit op (an instance attribute: parameter names stay vLLM's)."""
    import torch

    inner = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        if isinstance(out, tuple):
            hidden, residual = out[0], out[1]
            torch.ops.hpr.edit_residual_(hidden, residual, index)
        else:
            torch.ops.hpr.edit_hidden_(out, index)
        return out

    layer.forward = forward
