"""A decode step and a prefill chunk in one forward (mixed batches, as vLLM's chunked prefill runs them).

Two forwards, a prefill chunk and then a decode step, each read every weight of the model once; on a CPU or a
small GPU that read is most of the step, so a chunk between two decode steps doubles the running streams'
inter-token latency. Here the decode rows (B rows, one new token each) and the chunk (N prompts × c columns) run
as one flattened input of B + N·c tokens, shape (1, B + N·c): the embeddings, norms, linear layers, MLPs and HPR
edits see one sequence of tokens and read the weights once. Rotary embeddings need only each token's position id.

Attention is the one place where the two parts differ. :class:`MixedCache` takes the place of the model's cache
for that forward: it appends the decode tokens' keys/values to the running batch's cache and the chunk's to the
newcomers' cache, and hands both to :func:`mixed_attention`, which attends each part to its own cache with its
own mask, through transformers' own SDPA attention, and puts the outputs back in token order.

Only for architectures whose attention reads the cache and the attention function as Llama's does, and whose
model loop is Llama's (:data:`MIXABLE_MODEL_TYPES`: the compiled decode step runs the same loop), with
``attn_implementation="sdpa"`` and no sliding-window layer (each part is masked as full causal attention). The
family matrix (tests/server/engine/test_families.py) tests each of them; other models prefill in a forward of
their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.attention import AttentionLayout
from server.engine.kv_cache import BatchKVCache

MIXED_ATTENTION = "hpr_mixed"
# Llama's loop: embed_tokens (Gemma's scales inside it), rotary_emb, the layers, norm, lm_head. Not granite (its
# embedding and logit multipliers sit in the loop), nor cohere (a logit scale), gpt2 or gpt_neox (other loops).
MIXABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2"})


def can_mix(model: nn.Module) -> bool:
    """Whether ``model``'s attention can run a mixed forward (see the module docstring)."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in MIXABLE_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and AttentionLayout.of(model).window is None
    )


def split_tokens(states: Tensor, rows: int, chunk: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-head states of a mixed forward (1, H, B + N·c, D) → the decode rows' (B, H, 1, D) and the chunk's
    (N, H, c, D)."""
    heads, dim = states.shape[1], states.shape[-1]
    n, c = chunk
    decode = states[0, :, :rows].transpose(0, 1)[:, :, None]
    prefill = states[0, :, rows:].reshape(heads, n, c, dim).transpose(0, 1)
    return decode, prefill


@dataclass
class _Parts:
    """One layer's keys (or values) for the two parts, and the mask each part's queries attend with."""

    decode: Tensor  # (B, H_kv, L_d, D)
    prefill: Tensor  # (N, H_kv, L_p, D)
    decode_mask: Tensor | None = None  # (B, 1, 1, L_d) bool
    prefill_mask: Tensor | None = None  # (N, 1, c, L_p) bool


class MixedCache:
    """Stands in for the model's cache during a mixed forward: routes each part's keys/values to its own cache."""

    def __init__(
        self,
        decode: BatchKVCache,
        prefill: BatchKVCache,
        decode_rows: int,
        chunk: tuple[int, int],
        decode_mask: Tensor | None,
        prefill_mask: Tensor,
    ) -> None:
        self.decode = decode.growable_layers  # per layer, listed once per forward rather than once per layer
        self.prefill = prefill.growable_layers
        self.rows = decode_rows
        self.chunk = chunk  # (N, c)
        self.decode_mask = decode_mask
        self.prefill_mask = prefill_mask

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        k_decode, k_prefill = split_tokens(key_states, self.rows, self.chunk)
        v_decode, v_prefill = split_tokens(value_states, self.rows, self.chunk)
        dk, dv = self.decode[layer_idx].update(k_decode, v_decode)
        pk, pv = self.prefill[layer_idx].update(k_prefill, v_prefill)
        return _Parts(dk, pk, self.decode_mask, self.prefill_mask), _Parts(dv, pv)


def mixed_attention(
    module: nn.Module,
    query: Tensor,
    key: _Parts,
    value: _Parts,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of a mixed forward: ``query`` (1, H, B + N·c, D) → output (1, B + N·c, H, D)."""
    rows, n = key.decode.shape[0], key.prefill.shape[0]
    heads, dim = query.shape[1], query.shape[-1]
    c = (query.shape[2] - rows) // n
    q_decode, q_prefill = split_tokens(query, rows, (n, c))  # (B, H, 1, D), (N, H, c, D)
    out_decode, _ = sdpa_attention_forward(
        module, q_decode, key.decode, value.decode, key.decode_mask, dropout=dropout, scaling=scaling, **kwargs
    )  # (B, 1, H, D)
    out_prefill, _ = sdpa_attention_forward(
        module, q_prefill, key.prefill, value.prefill, key.prefill_mask, dropout=dropout, scaling=scaling, **kwargs
    )  # (N, c, H, D)
    out = torch.cat([out_decode.reshape(rows, heads, dim), out_prefill.reshape(n * c, heads, dim)])
    return out[None], None


AttentionInterface.register(MIXED_ATTENTION, mixed_attention)


@contextmanager
def mixed_attention_for(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s attention through :func:`mixed_attention` inside this block (the engine thread only)."""
    config: Any = model.config
    previous = config._attn_implementation
    config._attn_implementation = MIXED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
