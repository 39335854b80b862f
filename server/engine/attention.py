"""Which keys each layer's queries may see: full causal attention, a sliding window, or both, alternating.

The engine passes its own 4-D masks (padding, chunks, in-place joins), and transformers then uses them as they are
for every layer: a model with sliding-window layers would attend over the whole past in a batch. This module
reads from a model's config how its layers attend, and turns the engine's causal/padding mask into what each
layer needs:

- **full attention only** (llama, gpt2, ...): the mask as it is (None stays None: SDPA's fastest path);
- **a window on every layer** (mistral, phi3, starcoder2 with ``sliding_window`` set): one windowed mask;
- **alternating layer types** (gemma2, gemma3, qwen2/qwen3 with ``layer_types``): a ``{layer type: mask}`` mapping,
  which those models' forwards take as it is (transformers' ``causal_mask_mapping``).

The window is transformers' own definition (``masking_utils.sliding_window_overlay``): a query at position q sees
keys at positions k with ``q - window < k <= q``. Every row of an engine batch ends at the same cache column and
its tokens are contiguous, so a difference of columns is a difference of positions and the window is a band of
columns, whatever the padding.

The KV cache keeps every column, also those older than the window: memory grows as with full attention.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpr.errors import HPRError

FULL = "full_attention"
SLIDING = "sliding_attention"

# Masks as the model's forward takes them: one tensor (every layer alike), a mapping by layer type, or None.
Masks = Tensor | dict[str, Tensor] | None


class UnsupportedAttentionError(HPRError, ValueError):
    """The model's attention needs something the engine does not build (named in the message)."""


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's layers attend. ``window``: tokens a windowed layer's query sees (itself included), None when
    no layer is windowed; ``by_layer_type``: the model takes a ``{layer type: mask}`` mapping."""

    window: int | None = None
    by_layer_type: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> AttentionLayout:
        """The layout of ``model`` (:meth:`from_config`, and whether its forward takes masks by layer type)."""
        return cls.from_config(getattr(model, "config", None), type(model).__module__)

    @classmethod
    def from_config(cls, config: Any, forward_module: str | None = None) -> AttentionLayout:
        """Read the layout from a model's config; raises :class:`UnsupportedAttentionError` for an attention the
        engine cannot mask (it names the model type and the config field). ``forward_module``: the module of the
        model's class, to check that alternating layers can get a mask each (None: not checked)."""
        model_type = getattr(config, "model_type", "?")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedAttentionError(
                f"model type {model_type!r} has use_bidirectional_attention=True (an encoder): the server generates "
                "with causal attention only"
            )
        layer_types = getattr(config, "layer_types", None) or []
        unknown = sorted(set(layer_types) - {FULL, SLIDING})
        if unknown:
            raise UnsupportedAttentionError(
                f"model type {model_type!r}: config.layer_types has {unknown}; the engine masks only {FULL!r} and "
                f"{SLIDING!r} layers"
            )
        window = getattr(config, "sliding_window", None)
        windowed = SLIDING in layer_types if layer_types else window is not None
        if not windowed:
            return cls()
        if not isinstance(window, int) or window < 1:
            raise UnsupportedAttentionError(
                f"model type {model_type!r} has sliding-window layers but config.sliding_window is {window!r}"
            )
        if not layer_types:
            return cls(window=window)
        if forward_module is not None and not _takes_mask_mapping(forward_module):
            raise UnsupportedAttentionError(
                f"model type {model_type!r} alternates {FULL!r} and {SLIDING!r} layers, but its forward does not "
                "take a mask per layer type"
            )
        return cls(window=window, by_layer_type=True)

    def masks(self, mask: Tensor | None, queries: int, keys: int, rows: int, device: torch.device) -> Masks:
        """What the model's forward takes as ``attention_mask``, from the engine's bool ``mask`` (N, 1, q, k) or None
        (plain causal, nobody padded), for ``queries`` new columns at the end of ``keys`` columns (cache + new)."""
        if self.window is None:
            return mask
        key_columns = torch.arange(keys, device=device)  # (k,)
        query_columns = key_columns[keys - queries :]  # (q,)
        distance = query_columns[:, None] - key_columns[None, :]  # (q, k)
        if mask is None:
            mask = (distance >= 0)[None, None].expand(rows, 1, queries, keys)  # (N, 1, q, k)
        windowed = mask & (distance < self.window)[None, None]  # (N, 1, q, k)
        if not self.by_layer_type:
            return windowed
        return {FULL: mask, SLIDING: windowed}


def _takes_mask_mapping(module: str) -> bool:
    """Whether the model's forward (in ``module``) reads ``attention_mask`` as a mapping by layer type, as
    transformers' Gemma 2/3 and Qwen 2/3 do when ``generate`` prepares the masks."""
    try:
        source = inspect.getsource(importlib.import_module(module))
    except (OSError, TypeError, ImportError):
        return False
    return "causal_mask_mapping" in source


def convert_masks(masks: Masks, convert: Any) -> Masks:
    """``convert`` applied to each tensor of ``masks`` (e.g. a bool mask made additive for eager attention)."""
    if masks is None:
        return None
    if isinstance(masks, dict):
        return {kind: convert(m) for kind, m in masks.items()}
    result: Tensor = convert(masks)
    return result
