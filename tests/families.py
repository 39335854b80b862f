"""Tiny random-weight models of every model family the server supports, built from transformers' own config
classes with no download (the family matrix of issue 28).

4 layers, hidden 64 in 4 heads of 16 (2 KV heads where the family has grouped-query attention), the tiny character
tokenizer of tests/server/conftest.py, the config fields of ``tests.conftest.tiny_config_kwargs``. Weights are drawn
wider than the default init so greedy choices are not near-ties. ``WINDOWED`` variants set an 8-token sliding window:
on every layer (mistral), or on some layers, with the others full (gemma2, gemma3_text, qwen2). Another shape (the
vllm backend's, tests/server/vllm_backend/families.py) is the keyword arguments of :func:`family_config`.
"""

from __future__ import annotations

from typing import Any

import torch

from hpr.model import LoadedModel
from tests.conftest import tiny_config_kwargs
from tests.server.conftest import make_tiny_tokenizer

HIDDEN = 64
LAYERS = 4
HEAD_DIM = 16
WINDOW = 8

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "gpt_neox",
    "gpt2",
    "starcoder2",
    "cohere",
)
WINDOWED = ("gemma3_text", "gemma2", "mistral", "qwen2")
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def family_config(
    family: str,
    vocab: int,
    eos: int,
    window: int | None = None,
    *,
    hidden: int = HIDDEN,
    heads: int = HIDDEN // HEAD_DIM,
    max_positions: int = 256,
    **overrides: Any,
) -> Any:
    """The config of a tiny ``family`` model; ``window``: the sliding window (None: full attention everywhere).

    ``hidden`` is split into ``heads`` attention heads; ``overrides`` are config fields, set last.
    """
    from transformers import AutoConfig

    kwargs = tiny_config_kwargs(vocab, eos, hidden, LAYERS, heads, max_positions)
    kwargs["initializer_range"] = 0.2
    if family in ("gemma", "gemma2", "gemma3_text"):
        kwargs.update(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads)
    if family in ("gemma2", "gemma3_text"):
        # a window wider than any test sequence stands for "no window": these families always have one
        kwargs.update(sliding_window=window or 1024, layer_types=ALTERNATING)
    elif family == "qwen2" and window is not None:
        kwargs.update(sliding_window=window, use_sliding_window=True, layer_types=ALTERNATING)
    elif family in ("mistral", "qwen2", "qwen3", "phi3", "starcoder2"):
        kwargs.update(sliding_window=window)
    elif window is not None:
        raise ValueError(f"no windowed variant of {family}")
    if family == "granite":  # not 1.0, so that a loop missing one of them is caught
        kwargs.update(embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.2)
    if family == "gpt2":
        kwargs.update(n_inner=2 * hidden)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def make_family_model(family: str, window: int | None = None, seed: int = 0, **shape: Any) -> LoadedModel:
    """A tiny random ``family`` model with the tiny tokenizer, in memory, fp32 on the CPU, with the family's
    default attention (as ``load_model`` gets it); ``shape``: keyword arguments of :func:`family_config`."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = family_config(family, len(tokenizer), tokenizer.eos_token_id, window, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # its default attention, as load_model
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=f"tiny-{family}" + (f"-window{window}" if window else ""),
        source="memory",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
