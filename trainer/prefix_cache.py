"""Running many continuations of one prompt without recomputing the prompt: a frozen KV cache, expanded per batch.

A causal model's keys/values for a prompt do not depend on what follows, so the prompt is run once (batch 1)
and every batch of continuations starts from its cache, expanded (a view, no copy) to the batch size. Causal
attention plus right padding keeps the real tokens of each row exact. Used twice: a prefix shared by every
question (system prompt, the 6-shot primer), then each question's own prompt shared by its answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Called with the batch size of a forward pass; returns the context to run it in (e.g. an HPR edit plan).
ForwardContext = Callable[[int], AbstractContextManager[Any]]


def no_edit(_batch: int) -> AbstractContextManager[Any]:
    return nullcontext()


@dataclass(frozen=True)
class FrozenCache:
    """Keys/values of a batch-1 prefix: one ``(k, v)`` per layer, each (1, kv_heads, P, head_dim)."""

    layers: tuple[tuple[Tensor, Tensor], ...]
    length: int

    def expanded(self, batch: int, config: Any) -> Any:
        """A fresh ``DynamicCache`` holding this prefix for ``batch`` rows; updating it never touches ``self``."""
        from transformers import DynamicCache

        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(data, config=config)


def _freeze(cache: Any, length: int) -> FrozenCache:
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return FrozenCache(layers=layers, length=length)


class PrefixRunner:
    """Forward passes over ``model`` (a Hugging Face causal LM) that continue frozen prefixes.

    ``context(batch)`` wraps every forward pass (default: none); ``body_only`` skips the LM head (extraction).
    """

    def __init__(self, model: nn.Module, context: ForwardContext = no_edit, body_only: bool = False) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        self.context = context
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        self.body: nn.Module = decoder if body_only and isinstance(decoder, nn.Module) else model
        self.body_only = body_only and self.body is not model
        self.device = next(model.parameters()).device

    def _forward(self, ids: Tensor, mask: Tensor | None, cache: Any, logits_to_keep: int) -> Any:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "cache": cache, "use_cache": True}
        if not self.body_only:
            kwargs["logits_to_keep"] = logits_to_keep
        with self.context(ids.shape[0]):
            return self.body(**kwargs)

    def extend(self, prefix: FrozenCache | None, ids: Sequence[int]) -> tuple[FrozenCache, Tensor | None]:
        """Run ``ids`` (batch 1) after ``prefix``; return the longer frozen cache and the last position's logits
        (vocab,) (None when running the body only)."""
        if not ids:
            raise ValueError("extend needs at least one token")
        past = prefix.length if prefix is not None else 0
        cache = prefix.expanded(1, self.config) if prefix is not None else None
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        mask = torch.ones(1, past + len(ids), dtype=torch.long, device=self.device)
        out = self._forward(x, mask, cache, logits_to_keep=1)
        logits = None if self.body_only else out.logits[0, -1].float()
        return _freeze(cache, past + len(ids)), logits

    def continue_batch(
        self, prefix: FrozenCache, rows: Sequence[Sequence[int]], logits_to_keep: int = 0
    ) -> tuple[Any, Tensor]:
        """Run each of ``rows`` after ``prefix`` in one right-padded batch.

        Returns the model output (``.logits`` (B, T, V) unless body-only) and the (B, T) bool mask of real tokens.
        """
        batch, width = len(rows), max(len(r) for r in rows)
        pad = 0
        ids = torch.full((batch, width), pad, dtype=torch.long, device=self.device)  # (B, T)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long, device=self.device)
            valid[i, : len(row)] = True
        past = torch.ones(batch, prefix.length, dtype=torch.long, device=self.device)
        mask = torch.cat([past, valid.long()], dim=1)  # (B, P + T)
        out = self._forward(ids, mask, prefix.expanded(batch, self.config), logits_to_keep)
        return out, valid


def plan_batches(lengths: Sequence[int], max_tokens: int, call_cost: int = 48) -> list[list[int]]:
    """Group row indices into batches that minimise padded tokens plus a fixed ``call_cost`` per forward pass.

    Rows are sorted by length; an exact DP over split points (n is small: the answers of one question).
    Each batch's padded size stays ≤ ``max_tokens`` unless a single row is longer.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            area = (j - i) * sizes[j - 1]
            if area > max_tokens and j - i > 1:
                break
            cost = best[i] + call_cost + area
            if cost < best[j]:
                best[j], back[j] = cost, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        i = back[j]
        out.append(order[i:j])
        j = i
    return out[::-1]
