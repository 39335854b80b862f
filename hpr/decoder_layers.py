"""Finding the decoder layers of any Hugging Face decoder-only model, and reading their outputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hpr.errors import HPRError

# Where the common architectures keep their block list; tried first, then a generic search.
_KNOWN_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


def _get(module: nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def num_hidden_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise HPRError(f"cannot tell the number of layers of {type(model).__name__}: no config.num_hidden_layers")
    return n


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    h = getattr(text, "hidden_size", None)
    if not isinstance(h, int):
        raise HPRError(f"cannot tell the hidden size of {type(model).__name__}: no config.hidden_size")
    return h


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (llama, mistral, qwen2, gemma, gpt2, gpt-neox, ...)."""
    n = num_hidden_layers(model)
    for path in _KNOWN_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList) and len(found) == n:
            return found
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n
    ]
    if not candidates:
        raise HPRError(f"no list of {n} decoder layers found in {type(model).__name__}")
    return min(candidates, key=lambda item: item[0].count("."))[1]


def layer_output_tensor(output: Any) -> Tensor:
    """A decoder layer returns its hidden states as a tensor or as the first item of a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise HPRError(f"unexpected decoder layer output type {type(output).__name__}")


def replace_layer_output(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, Tensor):
        return hidden
    return (hidden, *output[1:])


@contextmanager
def capture_layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the block, ``captured[l]`` holds the output (B, T, h) of decoder layer ``l`` of the last forward."""
    blocks = find_decoder_layers(model)
    captured: dict[int, Tensor] = {}
    handles = []
    for index in layers:

        def hook(_m: nn.Module, _a: Any, out: Any, index: int = index) -> None:
            captured[index] = layer_output_tensor(out).detach()

        handles.append(blocks[index].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
