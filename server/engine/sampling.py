"""Next-token selection for a batch, vectorised over rows, each row with its own parameters and RNG.

Order per row (vLLM's): logit_bias → repetition / presence / frequency penalties → (logprobs are taken here) →
greedy argmax, or temperature → top-k → min-p → top-p → a draw. A sampled row draws one uniform number from
its own ``torch.Generator`` and inverts the CDF of its own distribution, so its result depends only on its
logits, its parameters and its seed: the same alone or in any batch. Rows with top-p < 1 invert the CDF in
descending-probability order, the others in vocabulary order (no sort needed); either order is decided by the
row's own parameters, never by its neighbours'.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from server.engine.types import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded, or from OS entropy. CPU keeps seeded draws device-independent."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


@dataclass
class SamplingState:
    """Per-row sampling parameters and penalty state of a batch, as tensors on the model's device.

    Optional tensors are None when no row of the batch needs them (the common case costs nothing).
    """

    params: list[SamplingParams]
    generators: list[torch.Generator]
    temperature: Tensor  # (B,) float32, 1.0 for greedy rows (unused there)
    greedy: Tensor  # (B,) bool
    top_k: Tensor  # (B,) long, 0 = off
    top_p: Tensor  # (B,) float32
    min_p: Tensor  # (B,) float32
    presence: Tensor  # (B,) float32
    frequency: Tensor  # (B,) float32
    repetition: Tensor  # (B,) float32
    logit_bias: Tensor | None  # (B, V) float32
    output_counts: Tensor | None  # (B, V) float32: how often each token was generated (penalties)
    prompt_seen: Tensor | None  # (B, V) bool: token occurs in the prompt (repetition penalty)
    matchers: list[Any]  # per row, its grammar matcher (server.engine.grammar), None for free text

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        matchers: Sequence[Any] | None = None,
    ) -> SamplingState:
        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        batch = len(params)
        bias: Tensor | None = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros((batch, vocab_size), dtype=torch.float32, device=device)
            for row, p in enumerate(params):
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
                    bias[row].index_put_((ids,), f32(list(p.logit_bias.values())))
        counts: Tensor | None = None
        seen: Tensor | None = None
        if any(_uses_penalties(p) for p in params):
            counts = torch.zeros((batch, vocab_size), dtype=torch.float32, device=device)
            seen = torch.zeros((batch, vocab_size), dtype=torch.bool, device=device)
            for row, (p, prompt) in enumerate(zip(params, prompts, strict=True)):
                if p.repetition_penalty != 1.0 and prompt:
                    seen[row, torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        return cls(
            params=list(params),
            generators=list(generators),
            temperature=f32([1.0 if p.greedy else p.temperature for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            presence=f32([p.presence_penalty for p in params]),
            frequency=f32([p.frequency_penalty for p in params]),
            repetition=f32([p.repetition_penalty for p in params]),
            logit_bias=bias,
            output_counts=counts,
            prompt_seen=seen,
            matchers=list(matchers) if matchers is not None else [None] * batch,
        )

    def filter(self, rows: Tensor, kept: Sequence[int]) -> SamplingState:
        def sel(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows)

        return SamplingState(
            params=[self.params[i] for i in kept],
            generators=[self.generators[i] for i in kept],
            temperature=self.temperature.index_select(0, rows),
            greedy=self.greedy.index_select(0, rows),
            top_k=self.top_k.index_select(0, rows),
            top_p=self.top_p.index_select(0, rows),
            min_p=self.min_p.index_select(0, rows),
            presence=self.presence.index_select(0, rows),
            frequency=self.frequency.index_select(0, rows),
            repetition=self.repetition.index_select(0, rows),
            logit_bias=sel(self.logit_bias),
            output_counts=sel(self.output_counts),
            prompt_seen=sel(self.prompt_seen),
            matchers=[self.matchers[i] for i in kept],
        )

    @classmethod
    def concatenate(cls, states: Sequence[SamplingState]) -> SamplingState:
        def cat_optional(parts: list[Tensor | None], like: Tensor, dtype: torch.dtype) -> Tensor | None:
            if all(p is None for p in parts):
                return None
            vocab = next(p for p in parts if p is not None).shape[1]
            full = [
                p if p is not None else torch.zeros((s.greedy.shape[0], vocab), dtype=dtype, device=like.device)
                for p, s in zip(parts, states, strict=True)
            ]
            return torch.cat(full)

        first = states[0].greedy
        return SamplingState(
            params=[p for s in states for p in s.params],
            generators=[g for s in states for g in s.generators],
            temperature=torch.cat([s.temperature for s in states]),
            greedy=torch.cat([s.greedy for s in states]),
            top_k=torch.cat([s.top_k for s in states]),
            top_p=torch.cat([s.top_p for s in states]),
            min_p=torch.cat([s.min_p for s in states]),
            presence=torch.cat([s.presence for s in states]),
            frequency=torch.cat([s.frequency for s in states]),
            repetition=torch.cat([s.repetition for s in states]),
            logit_bias=cat_optional([s.logit_bias for s in states], first, torch.float32),
            output_counts=cat_optional([s.output_counts for s in states], first, torch.float32),
            prompt_seen=cat_optional([s.prompt_seen for s in states], first, torch.bool),
            matchers=[m for s in states for m in s.matchers],
        )

    def record(self, tokens: Tensor) -> None:
        """Count the tokens (B,) just generated, for the frequency/presence/repetition penalties."""
        if self.output_counts is not None:
            self.output_counts.scatter_add_(
                1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.float32)[:, None]
            )


def _uses_penalties(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


@dataclass
class SampleResult:
    tokens: Tensor  # (B,) long
    logprobs: Tensor  # (B, V) float32 log-softmax after bias/penalties (only rows asked for are meaningful)


def process_logits(logits: Tensor, state: SamplingState) -> Tensor:
    """Apply logit bias and penalties to ``logits`` (B, V) float32; returns a new tensor."""
    out = logits
    if state.logit_bias is not None:
        out = out + state.logit_bias
    if state.output_counts is not None and state.prompt_seen is not None:
        counts = state.output_counts
        # repetition (CTRL / HF): divide positive logits, multiply negative ones, for tokens seen so far
        seen = state.prompt_seen | (counts > 0)
        rep = state.repetition[:, None]
        penalised = torch.where(out > 0, out / rep, out * rep)
        out = torch.where(seen, penalised, out)
        out = out - state.frequency[:, None] * counts - state.presence[:, None] * (counts > 0).float()
    return out


def sample(processed: Tensor, state: SamplingState) -> Tensor:
    """Pick one token per row of ``processed`` (B, V) float32 logits. Returns (B,) long."""
    greedy_tokens = processed.argmax(dim=-1)  # (B,)
    sampled_rows = [i for i, p in enumerate(state.params) if not p.greedy]
    if not sampled_rows:
        return greedy_tokens
    rows = torch.tensor(sampled_rows, dtype=torch.long, device=processed.device)
    x = processed.index_select(0, rows) / state.temperature.index_select(0, rows)[:, None]  # (n, V)
    params = [state.params[i] for i in sampled_rows]
    if any(p.top_k > 0 for p in params):
        k = state.top_k.index_select(0, rows)  # (n,)
        k_max = int(max(p.top_k for p in params))
        top_values = torch.topk(x, min(k_max, x.shape[-1]), dim=-1).values  # (n, k_max)
        kth = top_values.gather(1, (k.clamp(1, top_values.shape[-1]) - 1)[:, None])  # (n, 1)
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
        x = x.masked_fill(x < kth, -float("inf"))
    probs = torch.softmax(x, dim=-1)  # (n, V)
    if any(p.min_p > 0 for p in params):
        threshold = state.min_p.index_select(0, rows)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    uniforms = torch.tensor(
        [float(torch.rand((), generator=state.generators[i])) for i in sampled_rows],
        dtype=torch.float32,
    ).to(processed.device)  # (n,) one draw per row from its own generator
    chosen = _invert_cdf(probs, uniforms)  # vocabulary order
    nucleus = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        sub = torch.tensor(nucleus, dtype=torch.long, device=processed.device)
        top_p = state.top_p.index_select(0, rows).index_select(0, sub)[:, None]  # (m, 1)
        sorted_probs, order = torch.sort(probs.index_select(0, sub), dim=-1, descending=True)  # (m, V)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always survives
        picked = _invert_cdf(sorted_probs, uniforms.index_select(0, sub))
        chosen = chosen.index_copy(0, sub, order.gather(1, picked[:, None]).squeeze(1))
    return greedy_tokens.index_copy(0, rows, chosen)


def _invert_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Index i with CDF(i-1) ≤ u·total < CDF(i), per row of ``probs`` (n, V) (unnormalised is fine)."""
    cdf = torch.cumsum(probs, dim=-1)  # (n, V)
    target = (uniforms * cdf[:, -1])[:, None]  # (n, 1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (n,)
    # never pick a zero-probability token: clamp, and step back over trailing zeros caused by rounding
    index = index.clamp(max=probs.shape[-1] - 1)
    zero = probs.gather(1, index[:, None]).squeeze(1) <= 0
    return torch.where(zero, probs.argmax(dim=-1), index)  # no host sync: argmax is cheap
