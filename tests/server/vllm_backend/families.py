"""Tiny random-weight models of the families the vllm backend edits, saved as model directories vLLM loads.

Built from transformers' own config classes with no download: hidden 128 in 2 heads of 64 (a head size vLLM's
CPU attention takes), 4 layers, the tiny character tokenizer of tests/server/conftest.py. Weights are drawn wider
than the default init so the next-token distribution is peaked and greedy choices are not near-ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.server.conftest import make_tiny_tokenizer

HIDDEN = 128
LAYERS = 4

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")


def _config(family: str, vocab: int, eos: int) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 1024,
        "bos_token_id": 1,
        "eos_token_id": eos,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "initializer_range": 0.2,
    }
    if family in ("gemma2", "gemma3_text"):
        common.update(sliding_window=1024, query_pre_attn_scalar=64)
    if family == "gemma2":
        common.update(tie_word_embeddings=True)  # as every Gemma 2; vLLM's Gemma2ForCausalLM has no lm_head
    if family in ("qwen2", "qwen3", "mistral"):
        common.update(sliding_window=None)
    return AutoConfig.for_model(family, **common)


def save_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    """Write a loadable model directory of ``family`` (config, weights, tokenizer, generation config)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = _config(family, len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
