"""What the hf engine can do with a model family, decided from the model's config before its weights load.

An option the model cannot use stops the server at startup with a message naming the option and the model type
(:class:`UnsupportedOptionError`), instead of a traceback after the load or, worse, nothing said at all.
docs/server.md "Supported models" lists the families and what each can use, as the family matrix tests them.
"""

from __future__ import annotations

from typing import Any

from hpr.errors import HPRError
from server.engine.attention import AttentionLayout
from server.engine.mixed import MIXABLE_MODEL_TYPES

# Families whose weight matrices are transformers' Conv1D, not nn.Linear: int8 (torchao) quantizes only nn.Linear.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


class UnsupportedOptionError(HPRError, ValueError):
    """A server option the model cannot use (the message names both)."""


def check_options(config: Any, compile_decode: bool = False, quantization: str | None = None) -> AttentionLayout:
    """Raise :class:`UnsupportedOptionError` (or :class:`~server.engine.attention.UnsupportedAttentionError`) when
    the model ``config`` describes cannot run with these options; return its attention layout."""
    model_type = getattr(config, "model_type", "?")
    layout = AttentionLayout.from_config(config)
    if compile_decode:
        if model_type not in MIXABLE_MODEL_TYPES:
            raise UnsupportedOptionError(
                f"--compile-decode: the compiled decode step runs the model loop of {sorted(MIXABLE_MODEL_TYPES)}, "
                f"not of model type {model_type!r}; serve it without --compile-decode"
            )
        if layout.window is not None:
            raise UnsupportedOptionError(
                f"--compile-decode: model type {model_type!r} has sliding-window attention (config.sliding_window="
                f"{layout.window}), which the compiled decode step does not mask; serve it without --compile-decode"
            )
    if quantization == "int8" and model_type in CONV1D_MODEL_TYPES:
        raise UnsupportedOptionError(
            f"--quantization int8: model type {model_type!r} keeps its weights in Conv1D layers, and int8 quantizes "
            "only nn.Linear layers; serve it without --quantization"
        )
    return layout
