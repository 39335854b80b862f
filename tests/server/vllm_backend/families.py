"""Tiny random-weight models of the families the vllm backend edits, saved as model directories vLLM loads.

The models of tests/families.py at another shape: hidden 128 in 2 heads of 64 (a head size vLLM's CPU attention
takes), 4 layers, up to 1024 positions, the tiny character tokenizer of tests/server/conftest.py, no sliding window
narrower than that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.families import LAYERS, make_family_model

HIDDEN = 128
HEAD_DIM = 64

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")


def vllm_shape(family: str) -> dict[str, Any]:
    """The keyword arguments of :func:`tests.families.family_config` for ``family`` at the vLLM tests' shape."""
    # head_dim is set on every family: qwen3's own default is 128, whatever the hidden size
    shape: dict[str, Any] = {"hidden": HIDDEN, "heads": HIDDEN // HEAD_DIM, "max_positions": 1024, "head_dim": HEAD_DIM}
    if family == "gemma2":
        shape.update(tie_word_embeddings=True)  # as every Gemma 2; vLLM's Gemma2ForCausalLM has no lm_head
    if family == "gemma3_text":
        shape.update(layer_types=["sliding_attention"] * LAYERS)  # its own default at 4 layers: one full layer in 6
    return shape


def save_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    """Write a loadable model directory of ``family`` (config, weights, tokenizer, generation config)."""
    loaded = make_family_model(family, seed=seed, **vllm_shape(family))
    loaded.model.save_pretrained(str(directory))
    loaded.tokenizer.save_pretrained(str(directory))
    return directory
