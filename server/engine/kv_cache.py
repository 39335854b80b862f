"""A left-padded, growable KV cache for a batch of sequences, pluggable into stock transformers models.

Every row of the batch shares one column count ``length`` (TGI's left-padded layout): row ``i`` holds its tokens
in the last ``length - pad[i]`` columns and zeros in the first ``pad[i]`` (masked out by the engine's attention
mask). Each decode step appends one column for every row, so ``pad`` stays constant between batch changes.

Unlike ``DynamicCache`` (which concatenates, i.e. copies the whole cache, on every step), each layer keeps a
preallocated buffer (R, H_kv, head + capacity, D) and writes the new column in place; attention reads the view
``[:rows, :, head : head + length]``. The buffer grows by chunks when full.

Batch changes write only the rows that change. When rows leave, the batch's last rows move into the leavers'
places (:meth:`BatchKVCache.compact`), leaving spare rows at the end of the buffers, and padding that no kept row
needs is handed back to the head (:meth:`BatchKVCache.drop_left`). Newcomers are written into spare rows
(:meth:`BatchKVCache.join_in_place`); one longer than the running rows first takes columns from the head, the
running rows' padding growing by as much. Only when that does not fit are the caches copied into a new one
(:meth:`BatchKVCache.concatenate`). With 32 rows of 600 columns a copy moves ~0.9 GB in fp32 into fresh memory,
a pause of 0.1-3 s for every running stream here; writing the rows that change takes milliseconds.

Room for that (:func:`headroom`): on a CPU, each new buffer gets spare rows and a head of free columns. Memory
the process never writes costs no RAM there (the pages are mapped on first touch), so the room is free until a
batch change uses it. On a GPU memory is taken whole when allocated, and a copy is fast: no room is added there.
Measured in docs/benchmarks.md ("Batch changes without a copy").

Growth is the same kind of copy (every used column into a bigger buffer, 0.3-3 s for 40 rows of 600 columns here), so
on a CPU a buffer is also allocated wide enough for the columns its rows may still append (:meth:`BatchKVCache.plan`:
the prompt plus the longest remaining ``max_tokens``, at most :data:`AHEAD_COLUMNS` past the used ones), and those
columns are zeroed a chunk at a time as decoding reaches them (``ready``) instead of all at once: a row that stays
within its budget never makes the buffer grow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

GROWTH_CHUNK = 64  # columns added when a buffer is full (amortises the copy over many steps)
HEAD_COLUMNS = 512  # on a CPU, free columns on a new buffer's left: a newcomer up to this much longer joins in place
SPARE_ROWS = 8  # on a CPU, spare rows at least in a new buffer (and a quarter of its rows, if more)
AHEAD_COLUMNS = 2048  # on a CPU, columns at most allocated past the used ones for the rows' planned tokens


def _round_up(n: int) -> int:
    return -(-n // GROWTH_CHUNK) * GROWTH_CHUNK


def headroom(device: torch.device, rows: int, length: int) -> tuple[int, int]:
    """(spare rows, head columns) to allocate beside ``rows`` rows of ``length`` columns: on a CPU, room for
    newcomers to join without a copy (see the module docstring); none on other devices."""
    if not _roomy_device(device):
        return 0, 0
    return max(SPARE_ROWS, rows // 4), HEAD_COLUMNS


def _roomy_device(device: torch.device) -> bool:
    """Whether memory allocated on ``device`` costs nothing until written (a CPU: pages mapped on first touch)."""
    return device.type == "cpu"


class GrowableLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One decoder layer's keys and values.

    ``keys``/``values`` are views (R, H_kv, capacity, D) of buffers with ``head`` more columns on the left: the
    first ``rows`` rows and ``length`` columns of the views are used (R ≥ rows: the rows past ``rows`` are spare,
    their contents undefined; so are the head's columns, until :meth:`extend_left` zeroes the ones it takes).

    In a used row, the columns from ``length`` to ``ready`` hold zeros or keys/values once written there: never
    uninitialised memory, because the compiled decode step (:mod:`server.engine.compiled`) attends over the whole
    view with those columns masked, and a masked NaN would still poison the output (0 × NaN). Its buffers are exact
    (``ready`` is the capacity). In a roomy buffer on a CPU the columns past ``ready`` are left unwritten (they cost
    no RAM until then; nothing reads past ``length`` there) and are zeroed a growth chunk ahead as ``length``
    reaches them, so their page faults come together in one step of many. (Leaving every column past ``length``
    unwritten, faulted in one page at a time by the steps, was measured: no better, docs/benchmarks.md.)

    ``roomy``: whether new buffers get :func:`headroom` and, on a CPU, the columns of ``planned`` (off for the
    compiled step, which takes buffers of exactly the used rows and would copy them back out of a roomy one).
    ``planned``: the columns the rows may reach (prompt and longest remaining budget, in view columns); a hint.
    """

    def __init__(self, roomy: bool = True) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.length = 0
        self.rows = 0
        self.head = 0
        self.ready = 0
        self.planned = 0
        self.roomy = roomy
        self._buffers: tuple[Tensor, Tensor] | None = None  # (R, H_kv, head + capacity, D): what the views are of

    @property
    def spare_rows(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[0]) - self.rows

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def allocate(self, batch: int, length: int, spare: int, like_k: Tensor, like_v: Tensor) -> None:
        """Fresh buffers for ``batch`` rows whose first ``length`` columns the caller fills and at least ``spare``
        free columns after them, zeros; if ``roomy``, also :func:`headroom`, and on a CPU the columns of
        ``planned``, the free columns then zeroed only a growth chunk ahead (see the class docstring)."""
        spare_rows, head = headroom(like_k.device, batch, length) if self.roomy else (0, 0)
        cap = ready = _round_up(length + max(spare, 1))
        if self.roomy and _roomy_device(like_k.device):
            cap = max(cap, _round_up(min(self.planned, length + AHEAD_COLUMNS)))
            ready = min(cap, length + GROWTH_CHUNK)
        shape_k = (batch + spare_rows, like_k.shape[1], head + cap, like_k.shape[-1])
        shape_v = (batch + spare_rows, like_v.shape[1], head + cap, like_v.shape[-1])
        buffers = like_k.new_empty(shape_k), like_v.new_empty(shape_v)
        self._buffers, self.head = buffers, head
        self.keys, self.values = buffers[0][:, :, head:], buffers[1][:, :, head:]
        self.keys[:batch, :, length:ready] = 0  # never garbage (see the class docstring); spare rows stay untouched
        self.values[:batch, :, length:ready] = 0
        self.length = length
        self.ready = ready
        self.rows = batch
        self.is_initialized = True
        self.device = like_k.device

    def _reserve(self, needed: int, like_k: Tensor, like_v: Tensor) -> None:
        """Room for ``needed`` columns, those up to ``needed`` ready (a write there must not be zeroed later)."""
        if self.keys is None or needed > self.capacity:
            old = self.used() if self.keys is not None else None
            batch = self.rows if old is not None else like_k.shape[0]
            length = self.length if old is not None else 0
            cap = _round_up(max(needed, self.capacity + self.capacity // 2))
            self.allocate(batch, length, cap - length, like_k, like_v)
            if old is not None and length:
                assert self.keys is not None and self.values is not None
                self.keys[:batch, :, :length] = old[0]
                self.values[:batch, :, :length] = old[1]
        if needed > self.ready:  # a roomy buffer's next chunk, zeroed together (see the class docstring)
            assert self.keys is not None and self.values is not None
            ready = min(self.capacity, needed + GROWTH_CHUNK)
            self.keys[: self.rows, :, self.ready : ready] = 0
            self.values[: self.rows, :, self.ready : ready] = 0
            self.ready = ready

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` columns (the layer must hold keys already)."""
        assert self.keys is not None and self.values is not None
        self._reserve(needed, self.keys, self.values)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``key_states`` (B, H_kv, T, D) and return the used views (B, H_kv, length, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self._reserve(self.length + t, key_states, value_states)
        assert self.keys is not None and self.values is not None
        rows = self.rows
        if key_states.shape[0] != rows:
            raise ValueError(f"{key_states.shape[0]} rows of keys for a cache of {rows} rows")
        self.keys[:rows, :, self.length : self.length + t] = key_states
        self.values[:rows, :, self.length : self.length + t] = value_states
        self.length += t
        return self.keys[:rows, :, : self.length], self.values[:rows, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length + tokens_to_remove) if tokens_to_remove < 0 else self.length

    def used(self) -> tuple[Tensor, Tensor]:
        """The used rows and columns (rows, H_kv, length, D)."""
        assert self.keys is not None and self.values is not None
        return self.keys[: self.rows, :, : self.length], self.values[: self.rows, :, : self.length]

    def _move_view(self, head: int) -> None:
        assert self._buffers is not None
        shift = self.head - head  # columns the view gains on its left
        self.head = head
        self.keys, self.values = self._buffers[0][:, :, head:], self._buffers[1][:, :, head:]
        self.ready += shift
        self.planned = self.planned + shift if self.planned else 0

    def extend_left(self, columns: int) -> None:
        """``columns`` (≤ ``head``) more columns on the left of every used row, zeros: ``length`` grows by as much."""
        if not 0 <= columns <= self.head:
            raise ValueError(f"extend_left: {columns} columns with a head of {self.head}")
        self._move_view(self.head - columns)
        assert self.keys is not None and self.values is not None
        self.keys[: self.rows, :, :columns] = 0
        self.values[: self.rows, :, :columns] = 0
        self.length += columns

    def drop_left(self, columns: int) -> None:
        """Hand the first ``columns`` columns (padding in every used row) back to the head: ``length`` shrinks."""
        if not 0 <= columns <= self.length:
            raise ValueError(f"drop_left: {columns} columns of {self.length}")
        self._move_view(self.head + columns)
        self.length -= columns

    def set_used(self, keys: Tensor, values: Tensor, spare: int) -> None:
        """Replace the contents with ``keys``/``values`` (B, H_kv, L, D), leaving ``spare`` free columns."""
        length = keys.shape[2]
        self.allocate(keys.shape[0], length, spare, keys, values)
        assert self.keys is not None and self.values is not None
        self.keys[: self.rows, :, :length] = keys
        self.values[: self.rows, :, :length] = values

    def exact_buffers(self) -> None:
        """Buffers of exactly the used rows and their ``ready`` columns, no head (a copy, when there is room), and
        no room from now on."""
        self.roomy = False
        has_room = self.spare_rows or self.head or self.ready < self.capacity
        if self.keys is not None and self.values is not None and has_room:
            rows, ready = self.rows, self.ready
            keys, values = self.keys[:rows, :, :ready].clone(), self.values[:rows, :, :ready].clone()
            self._buffers, self.head, self.keys, self.values = (keys, values), 0, keys, values


class BatchKVCache(Cache):
    """The KV cache of one engine batch; all layers hold the same ``length`` columns. ``roomy``: see
    :class:`GrowableLayer`."""

    def __init__(self, num_layers: int, roomy: bool = True) -> None:
        super().__init__(layers=[GrowableLayer(roomy) for _ in range(num_layers)])

    @property
    def growable_layers(self) -> list[GrowableLayer]:
        return [layer for layer in self.layers if isinstance(layer, GrowableLayer)]

    @property
    def length(self) -> int:
        return self.growable_layers[0].length if self.layers else 0

    @property
    def roomy(self) -> bool:
        return all(layer.roomy for layer in self.growable_layers)

    def plan(self, columns: int) -> None:
        """The columns the rows may reach (see :class:`GrowableLayer`'s ``planned``): on a CPU, buffers allocated
        from now on have them, so that decoding within the plan never grows (copies) the cache."""
        for layer in self.growable_layers:
            layer.planned = columns

    @property
    def planned(self) -> int:
        return self.growable_layers[0].planned if self.layers else 0

    def rewind(self, length: int) -> None:
        """Forget every column past ``length`` in every layer (undo a forward that failed part-way)."""
        for layer in self.growable_layers:
            layer.length = length

    @property
    def batch_size(self) -> int:
        return self.growable_layers[0].rows if self.layers else 0

    def compact(self, order: Sequence[int]) -> None:
        """Keep rows ``order`` (row j becomes old row ``order[j]``), in place: only the rows that move are copied,
        and the buffers keep their size (the rows past ``len(order)`` become spare). A moved row must come from
        past the new end (``order[j] == j`` or ``order[j] >= len(order)``), so no source is overwritten first."""
        n = len(order)
        moves = [(j, src) for j, src in enumerate(order) if src != j]
        if any(src < n for _, src in moves) or len(set(order)) != n or (order and max(order) >= self.batch_size):
            raise ValueError(f"compact: rows {list(order)} of {self.batch_size} are not a keep-and-fill order")
        for layer in self.growable_layers:
            assert layer.keys is not None and layer.values is not None
            ready = layer.ready
            for j, src in moves:  # up to `ready`: a used row's columns past `length` stay zeros, never garbage
                layer.keys[j, :, :ready] = layer.keys[src, :, :ready]
                layer.values[j, :, :ready] = layer.values[src, :, :ready]
            layer.rows = n

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` columns, padding in every row, without a copy (see
        :meth:`GrowableLayer.drop_left`)."""
        for layer in self.growable_layers:
            layer.drop_left(columns)

    def join_in_place(self, caches: Sequence[BatchKVCache]) -> bool:
        """Write the rows of ``caches`` into this cache's spare rows, left-padded with zeros to the longest
        ``length``; a cache longer than this one first takes columns from the head (this cache's rows get as many
        more zero columns on the left). False, with nothing changed, when they do not fit: too few spare rows, or
        longer than the head allows."""
        count = sum(c.batch_size for c in caches)
        layers = self.growable_layers
        if not layers or not caches:
            return False
        extend = max(c.length for c in caches) - self.length
        if layers[0].spare_rows < count or any(extend > layer.head for layer in layers):
            return False
        for layer in layers:
            layer.extend_left(max(extend, 0))
        length = self.length
        self.plan(max(self.planned, *(_shifted_plan(c, length) for c in caches)))
        for index, target in enumerate(layers):
            assert target.keys is not None and target.values is not None
            at, ready = target.rows, target.ready
            for cache in caches:
                keys, values = cache.growable_layers[index].used()  # (b, H_kv, l, D)
                b, missing = keys.shape[0], length - keys.shape[2]
                for buffer, part in ((target.keys, keys), (target.values, values)):
                    buffer[at : at + b, :, :missing] = 0
                    buffer[at : at + b, :, missing:length] = part
                    buffer[at : at + b, :, length:ready] = 0  # never garbage (see GrowableLayer)
                at += b
            target.rows = at
        return True

    def exact_buffers(self) -> None:
        """Buffers of exactly the used rows, no head, no room later (see :meth:`GrowableLayer.exact_buffers`): for
        code that reads whole buffers."""
        for layer in self.growable_layers:
            layer.exact_buffers()

    def select(self, rows: Tensor, drop_columns: int, spare: int) -> BatchKVCache:
        """A new cache with ``rows`` (n,) long, without the first ``drop_columns`` columns (padding no kept row
        uses) and ``spare`` free columns; ``self`` is left unchanged.

        Each kept run of consecutive rows is copied once, straight into the new buffer: with 32 rows of 600 columns
        this cache is ~0.9 GB in fp32, and every extra pass over it is a pause for every running stream.
        """
        out = BatchKVCache(len(self.layers), self.roomy)
        out.plan(max(self.planned - drop_columns, 0))
        runs = _runs([int(r) for r in rows.tolist()])
        for mine, theirs in zip(self.growable_layers, out.growable_layers, strict=True):
            keys, values = mine.used()
            length = keys.shape[2] - drop_columns
            theirs.allocate(len(rows), length, spare, keys, values)
            assert theirs.keys is not None and theirs.values is not None
            at = 0
            for first, count in runs:
                theirs.keys[at : at + count, :, :length] = keys[first : first + count, :, drop_columns:]
                theirs.values[at : at + count, :, :length] = values[first : first + count, :, drop_columns:]
                at += count
        return out

    @classmethod
    def concatenate(cls, caches: Sequence[BatchKVCache], spare: int) -> BatchKVCache:
        """Stack the rows of ``caches`` into one cache, left-padding each to the longest ``length`` with zeros.

        Zeros (not garbage) matter: padded columns are masked, but 0 × NaN would still poison attention. Each part
        is copied once, straight into its rows of the new buffer (no padded copy, no concatenated copy). The new
        cache is roomy as the first one is.
        """
        num_layers = len(caches[0].layers)
        length = max(c.length for c in caches)
        rows = sum(c.batch_size for c in caches)
        out = cls(num_layers, caches[0].roomy)
        out.plan(max(_shifted_plan(c, length) for c in caches))
        for index in range(num_layers):
            target = out.growable_layers[index]
            first_k, first_v = caches[0].growable_layers[index].used()
            target.allocate(rows, length, spare, first_k, first_v)
            assert target.keys is not None and target.values is not None
            at = 0
            for cache in caches:
                keys, values = cache.growable_layers[index].used()  # (b, H_kv, l, D)
                count, missing = keys.shape[0], length - keys.shape[2]
                target.keys[at : at + count, :, :missing] = 0
                target.values[at : at + count, :, :missing] = 0
                target.keys[at : at + count, :, missing:length] = keys
                target.values[at : at + count, :, missing:length] = values
                at += count
        return out


def _shifted_plan(cache: BatchKVCache, length: int) -> int:
    """``cache``'s plan for its rows once they are left-padded to ``length`` columns (0: none)."""
    return cache.planned + length - cache.length if cache.planned else 0


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` as (first, count) runs of consecutive indices, in order: [0, 1, 2, 5, 6] → [(0, 3), (5, 2)]."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs
