"""The running batch (TGI's shape): rows, a left-padded KV cache, sampling state; ``filter`` and ``concatenate``.

It holds rows and caches only: the edit plan of a step is the runner's, and each request's edit statistics are
its own :class:`~hpr.edit_stats.EditStatsCounter`.

Row ``i`` of a batch of cache length ``L`` has ``pad[i]`` padding columns on the left, so its next token sits at
absolute position ``L - pad[i]`` and may attend to columns ``≥ pad[i]``. Both stay valid across decode steps
(every row gains one column per step), and are recomputed only by :meth:`Batch.filter` (rows leave; padding no
kept row needs is dropped) and :meth:`Batch.concatenate` (rows join; shorter batches get more left padding).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hpr.edit_stats import EditStats, EditStatsCounter
from hpr.editing import EditPlan, EditSpec
from hpr.registry import AdapterRegistry
from server.engine.kv_cache import GROWTH_CHUNK, BatchKVCache
from server.engine.sampling import SamplingState
from server.engine.types import FinishReason, GenerationRequest


@dataclass
class EngineEvent:
    """What the engine thread hands to a request's consumer; text is made on the consumer side."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # (token, logprob, top alternatives)
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]] | None] | None = None
    finish_reason: FinishReason | None = None
    edit_stats: EditStats | None = None
    error: BaseException | None = None


@dataclass(eq=False)  # identity semantics: states live in sets and queues
class RequestState:
    """One request as the engine thread sees it. ``cancelled`` is set by the consumer, read by the engine."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineEvent]
    generator: torch.Generator
    stop_ids: frozenset[int]
    max_new_tokens: int  # max_tokens clamped to the room left in the context
    arrival: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    last_token_time: float | None = None
    stats: EditStatsCounter | None = None  # when return_stats and the request edits
    lease: AdapterRegistry | None = None  # holds the request's adapter loaded until finish()
    cancelled: bool = False
    done: bool = False  # the engine sent the last event (or failed the request)
    completion_tokens_seen: int | None = None  # set by the consumer when it stops early on a stop string
    matcher: Any = None  # the grammar matcher of an output constraint (server.engine.grammar), None: free text

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    def finish(self) -> None:
        """The request will run no more: mark it done and let its adapter go (an unload may be waiting)."""
        self.done = True
        registry, self.lease = self.lease, None
        if registry is not None and self.request.edit is not None:
            registry.release(self.request.edit.adapter)

    def edit_stats(self) -> EditStats | None:
        """The statistics to report with the last event: an empty record for a request that asked but edits
        nothing, None for one that did not ask."""
        if not self.request.return_stats:
            return None
        return self.stats.result() if self.stats is not None else EditStats(layers={})


def decode_spec(state: RequestState) -> EditSpec | None:
    """The spec of a decode step's row, whose input token is a generated one: every position is then at or past
    ``spec.first_edited_position(prompt)``, so scope ``generated`` equals ``all`` (and needs no positions); and
    past the request's token limit the row is not edited at all (None)."""
    spec = state.request.edit
    return replace(spec, scope="all", tokens=None) if spec is not None and _decode_edits(state) else None


def _decode_edits(state: RequestState) -> bool:
    spec = state.request.edit
    return spec is not None and not spec.is_noop and spec.edits_decode_step(len(state.generated))


def decode_edited(requests: Sequence[RequestState]) -> tuple[bool, ...]:
    """Per row, whether its decode step is edited: what a decode plan depends on besides the rows themselves."""
    return tuple(_decode_edits(r) for r in requests)


@dataclass
class Batch:
    """The rows being decoded together. ``next_tokens`` (B,) are the tokens to feed at the next step."""

    requests: list[RequestState]
    cache: BatchKVCache
    pad: Tensor  # (B,) long: left padding columns per row
    next_tokens: Tensor  # (B,) long
    sampling: SamplingState
    _padded: bool | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def length(self) -> int:
        return self.cache.length

    def positions(self) -> Tensor:
        """(B, 1) absolute positions of ``next_tokens``."""
        return (self.length - self.pad)[:, None]

    def attention_mask(self) -> Tensor | None:
        """(B, 1, 1, L + 1) bool: which cache columns (plus the new token) each row may attend to.

        None when no row has padding: attention then sees every column and SDPA takes its fastest path.
        """
        if self._padded is None:
            self._padded = bool(self.pad.any())  # one host sync per batch composition, not per step
        if not self._padded:
            return None
        columns = torch.arange(self.length + 1, device=self.pad.device)  # (L + 1,)
        return (columns[None, :] >= self.pad[:, None])[:, None, None, :]

    def filter(self, keep: Sequence[int], in_place: bool = False) -> Batch | None:
        """A batch of rows ``keep`` (indices, in order); None when no row is left. Drops padding nobody needs.

        ``self`` stays usable (its cache is copied, not mutated), so a step can be retried on a sub-batch. With
        ``in_place`` (for a batch that is replaced by the result), the last kept rows move into the places of the
        rows that leave, in the cache itself (:meth:`BatchKVCache.compact`), and padding no kept row needs goes
        back to the cache's head (:meth:`BatchKVCache.drop_left`): ``keep``'s rows, in another order, and ``self``
        is spent.
        """
        if not keep:
            return None
        if list(keep) == list(range(len(self.requests))):
            return self
        if in_place:
            order = fill_order(keep)
            rows = torch.tensor(order, dtype=torch.long, device=self.pad.device)
            pad = self.pad.index_select(0, rows)
            drop = int(pad.min())  # columns that are padding for every kept row
            self.cache.compact(order)
            self.cache.drop_left(drop)
            return Batch(
                requests=[self.requests[i] for i in order],
                cache=self.cache,
                pad=pad - drop,
                next_tokens=self.next_tokens.index_select(0, rows),
                sampling=self.sampling.filter(rows, order),
            )
        rows = torch.tensor(list(keep), dtype=torch.long, device=self.pad.device)
        pad = self.pad.index_select(0, rows)
        drop = int(pad.min())  # columns that are padding for every kept row
        spare = max(min(r.max_new_tokens - len(r.generated) for r in (self.requests[i] for i in keep)), 1)
        return Batch(
            requests=[self.requests[i] for i in keep],
            cache=self.cache.select(rows, drop, min(spare, GROWTH_CHUNK)),
            pad=pad - drop,
            next_tokens=self.next_tokens.index_select(0, rows),
            sampling=self.sampling.filter(rows, keep),
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """One batch with the rows of ``batches`` in order; each is left-padded to the longest cache. The first
        batch's cache takes the others' rows in place when it has room for them (spare rows, and head columns for
        a longer one: :meth:`BatchKVCache.join_in_place`); then the first batch is spent."""
        if len(batches) == 1:
            return batches[0]
        lengths = [b.length for b in batches]  # before the join: in place, it lengthens the first batch's cache
        length = max(lengths)
        first = batches[0].cache
        if first.join_in_place([b.cache for b in batches[1:]]):
            cache = first
        else:
            cache = BatchKVCache.concatenate([b.cache for b in batches], spare=GROWTH_CHUNK)
        return cls(
            requests=[r for b in batches for r in b.requests],
            cache=cache,
            pad=torch.cat([b.pad + (length - own) for b, own in zip(batches, lengths, strict=True)]),
            next_tokens=torch.cat([b.next_tokens for b in batches]),
            sampling=SamplingState.concatenate([b.sampling for b in batches]),
        )


@dataclass
class DecodePlan:
    """The edit plan of a decode step for one batch composition (rows in order, each edited or past its
    ``edit_tokens`` limit), and per layer how many rows it edits (the ``on_edit`` metric). Built once per
    composition, reused every step."""

    rows: tuple[RequestState, ...]
    plan: EditPlan | None
    edited_rows: dict[int, int]
    edited: tuple[bool, ...] = ()  # per row, whether it is edited (a row stops at its edit_tokens limit)

    @classmethod
    def build(cls, requests: Sequence[RequestState]) -> DecodePlan:
        specs = [decode_spec(r) for r in requests]
        counts: dict[int, int] = {}
        for spec in specs:
            for layer in spec.layers if spec is not None else ():
                counts[layer] = counts.get(layer, 0) + 1
        collect = any(r.stats is not None for r in requests)
        plan = None if all(s is None for s in specs) else EditPlan(rows=specs, collect_stats=collect)
        edited = tuple(s is not None for s in specs)
        return cls(rows=tuple(requests), plan=plan, edited_rows=counts, edited=edited)

    def fits(self, batch: Batch) -> bool:
        """Whether ``batch`` has exactly these rows, in this order (RequestState compares by identity), each still
        edited as when the plan was built."""
        return (
            len(self.rows) == len(batch.requests)
            and all(a is b for a, b in zip(self.rows, batch.requests, strict=True))
            and self.edited == decode_edited(batch.requests)
        )


@dataclass
class PrefillInputs:
    """Left-padded prompts of newcomers: model inputs plus what the edit plan needs."""

    input_ids: Tensor  # (N, T) long, pad id on the left
    position_ids: Tensor  # (N, T) long, 0 at padding
    attention_mask: Tensor | None  # (N, 1, T, T) bool: causal, padding keys hidden (a pad query sees itself:
    # no NaN); None when no prompt is padded (plain causal attention, SDPA's fastest path)
    valid: Tensor  # (N, T) bool, False at padding
    pad: Tensor  # (N,) long

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> PrefillInputs:
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        t = int(lengths.max())
        pad = t - lengths  # (N,)
        ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, t - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        columns = torch.arange(t)  # (T,)
        valid = columns[None, :] >= pad[:, None]  # (N, T)
        positions = (columns[None, :] - pad[:, None]).clamp_min(0)  # (N, T)
        causal = columns[:, None] >= columns[None, :]  # (T, T) query × key
        diagonal = torch.eye(t, dtype=torch.bool)
        mask = causal[None] & (valid[:, None, :] | diagonal[None])  # (N, T, T)
        return cls(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask[:, None].to(device) if bool(pad.any()) else None,
            valid=valid.to(device),
            pad=pad.to(device),
        )

    @property
    def columns(self) -> int:
        return int(self.input_ids.shape[1])

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Columns ``start:stop`` as one forward's inputs after ``start`` columns already in the cache:
        ``(ids, positions, mask)`` with the mask (N, 1, stop - start, stop) over cache + chunk."""
        if start == 0 and stop == self.columns:
            return self.input_ids, self.position_ids, self.attention_mask
        keys = torch.arange(stop, device=self.valid.device)  # (stop,)
        queries = keys[start:stop]  # (c,)
        causal = queries[:, None] >= keys[None, :]  # (c, stop)
        diagonal = queries[:, None] == keys[None, :]
        mask = causal[None] & (self.valid[:, None, :stop] | diagonal[None])  # (N, c, stop): a pad query sees itself
        return (
            self.input_ids[:, start:stop],
            self.position_ids[:, start:stop],
            mask[:, None],  # explicit even without padding: SDPA's own causal mask is wrong once q ≠ k
        )

    def edit_plan(self, requests: Sequence[RequestState], start: int = 0, stop: int | None = None) -> EditPlan | None:
        """The edit plan of columns ``start:stop`` (default: all of them)."""
        specs = [
            r.request.edit if r.request.edit is not None and not r.request.edit.is_noop else None for r in requests
        ]
        if all(s is None for s in specs):
            return None
        stop = self.columns if stop is None else stop
        valid = self.valid[:, start:stop]
        positions = self.position_ids[:, start:stop]
        return EditPlan(
            rows=specs,
            positions=torch.where(valid, positions, torch.full_like(positions, -1)),
            prompt_lengths=[r.prompt_len for r in requests],
            collect_stats=any(r.stats is not None for r in requests),
            valid=valid,
        )


def mixed_edit_plan(
    decoding: Sequence[RequestState], prefilling: Sequence[RequestState], inputs: PrefillInputs, start: int, stop: int
) -> EditPlan | None:
    """The flat edit plan of a mixed forward (:mod:`server.engine.mixed`): the decode rows' tokens, then the chunk's
    columns ``start:stop`` row by row, each token a row of its own."""
    decode_specs = [decode_spec(r) for r in decoding]
    prefill_specs = [r.request.edit if r.request.edit is not None and not r.request.edit.is_noop else None
                     for r in prefilling]  # fmt: skip
    if all(s is None for s in [*decode_specs, *prefill_specs]):
        return None
    n, c = len(prefilling), stop - start
    device = inputs.valid.device
    valid = inputs.valid[:, start:stop]  # (N, c)
    positions = torch.where(valid, inputs.position_ids[:, start:stop], -1)  # (N, c)
    b = len(decoding)
    return EditPlan(
        rows=[*decode_specs, *(spec for spec in prefill_specs for _ in range(c))],
        # decode rows edit every position they have (decode_spec), so their positions are never read
        positions=torch.cat([torch.zeros(b, 1, dtype=torch.long, device=device), positions.reshape(n * c, 1)]),
        prompt_lengths=[0] * b + [r.prompt_len for r in prefilling for _ in range(c)],
        collect_stats=any(r.stats is not None for r in [*decoding, *prefilling]),
        valid=torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), valid.reshape(n * c, 1)]),
        flat=True,
    )


def fill_order(keep: Sequence[int]) -> list[int]:
    """``keep`` (increasing row indices) as the order :meth:`BatchKVCache.compact` keeps them in: a kept row stays
    where it is, and the kept rows past the new end move, in order, into the places of the rows that leave.
    [0, 2, 3, 5] → [0, 5, 2, 3]: row 1 leaves, row 5 takes its place, row 4 leaves from past the end."""
    n = len(keep)
    kept = set(keep)
    order = list(range(n))
    tail = iter(i for i in keep if i >= n)
    for j in range(n):
        if j not in kept:
            order[j] = next(tail)
    return order
