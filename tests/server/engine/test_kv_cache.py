"""server/engine/kv_cache.py: rows joined and kept are copied exactly, padding and spare columns are zeros, and
batch changes that fit the buffers' room write in place."""

from __future__ import annotations

import gc
import resource

import pytest
import torch

from server.engine.batch import fill_order
from server.engine.kv_cache import (
    AHEAD_COLUMNS,
    GROWTH_CHUNK,
    HEAD_COLUMNS,
    SPARE_ROWS,
    BatchKVCache,
    GrowableLayer,
    _runs,
    headroom,
)


def random_cache(rows: int, length: int, layers: int = 3, seed: int = 0, roomy: bool = True) -> BatchKVCache:
    generator = torch.Generator().manual_seed(seed)
    cache = BatchKVCache(layers, roomy=roomy)
    for layer in cache.growable_layers:
        keys = torch.randn(rows, 2, length, 4, generator=generator)
        layer.set_used(keys, torch.randn(rows, 2, length, 4, generator=generator), spare=5)
    return cache


def _snapshot(cache: BatchKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's used keys and values, copied: the reference the in-place operations are checked against."""
    return [(k.clone(), v.clone()) for k, v in (layer.used() for layer in cache.growable_layers)]


def _storage(layer: GrowableLayer) -> int:
    assert layer.keys is not None
    return layer.keys.untyped_storage().data_ptr()


def _zeros_past_length(layer: GrowableLayer) -> bool:
    """A used row's columns from ``length`` to ``ready`` are zeros (the compiled step reads them, masked): in an
    exact buffer every column past ``length``."""
    assert layer.keys is not None and layer.values is not None
    rows, length, ready = layer.rows, layer.length, layer.ready
    assert length <= ready <= layer.capacity and (layer.roomy or ready == layer.capacity)
    return not layer.keys[:rows, :, length:ready].any() and not layer.values[:rows, :, length:ready].any()


@pytest.fixture
def nan_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh buffers full of NaN, as uninitialised memory may be: what must be zeros is then written."""
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, size, **_: torch.full(size, float("nan")))


def test_runs_group_consecutive_rows() -> None:
    assert _runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
    assert _runs([3, 2]) == [(3, 1), (2, 1)]  # order is kept: a row may move
    assert _runs([]) == []


def test_headroom_on_a_cpu_only() -> None:
    assert headroom(torch.device("cpu"), 4, 100) == (SPARE_ROWS, HEAD_COLUMNS)
    assert headroom(torch.device("cpu"), 40, 700) == (10, HEAD_COLUMNS)  # a quarter of the rows
    assert headroom(torch.device("cuda"), 40, 700) == (0, 0)  # a GPU allocates memory whole: no room there


def test_a_new_buffer_has_spare_rows_and_a_head_unless_not_roomy() -> None:
    roomy, exact = random_cache(3, 7, seed=1), random_cache(3, 7, seed=1, roomy=False)
    for layer in roomy.growable_layers:
        assert layer.spare_rows == SPARE_ROWS and layer.head == HEAD_COLUMNS and layer.capacity >= 7 + 5
    for layer in exact.growable_layers:
        assert layer.spare_rows == 0 and layer.head == 0
    for (rk, rv), (ek, ev) in zip(_snapshot(roomy), _snapshot(exact), strict=True):
        assert torch.equal(rk, ek) and torch.equal(rv, ev)


@pytest.mark.parametrize("roomy", [True, False])
def test_concatenate_left_pads_with_zeros_and_keeps_every_value(roomy: bool, nan_memory: None) -> None:
    a, b = random_cache(3, 7, seed=1, roomy=roomy), random_cache(2, 4, seed=2)
    joined = BatchKVCache.concatenate([a, b], spare=6)
    assert joined.length == 7 and joined.batch_size == 5
    for index, layer in enumerate(joined.growable_layers):
        used = dict(zip(("keys", "values"), layer.used(), strict=True))
        for name in ("keys", "values"):
            ka = getattr(a.growable_layers[index], name)[:3, :, :7]
            kb = getattr(b.growable_layers[index], name)[:2, :, :4]
            # Reference built by hand: b left-padded by 3 zero columns, rows stacked.
            expected = torch.cat([ka, torch.cat([torch.zeros(2, 2, 3, 4), kb], dim=2)])
            assert torch.equal(used[name], expected)
        assert layer.capacity >= 7 + 6 and _zeros_past_length(layer)
        assert layer.roomy == roomy  # as the first cache
        assert (layer.spare_rows, layer.head) == ((SPARE_ROWS, HEAD_COLUMNS) if roomy else (0, 0))


@pytest.mark.parametrize("roomy", [True, False])
def test_select_keeps_rows_in_order_drops_columns_and_leaves_the_source_unchanged(
    roomy: bool, nan_memory: None
) -> None:
    cache = random_cache(6, 9, seed=3, roomy=roomy)
    before = _snapshot(cache)
    rows = torch.tensor([4, 0, 1, 2, 5])
    kept = cache.select(rows, drop_columns=2, spare=3)
    assert kept.length == 7 and kept.batch_size == 5
    for layer, (keys, values) in zip(kept.growable_layers, before, strict=True):
        got_k, got_v = layer.used()
        assert torch.equal(got_k, torch.stack([keys[r, :, 2:9] for r in [4, 0, 1, 2, 5]]))
        assert torch.equal(got_v, torch.stack([values[r, :, 2:9] for r in [4, 0, 1, 2, 5]]))
        assert layer.capacity >= 7 + 3 and _zeros_past_length(layer) and layer.roomy == roomy
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_snapshot(cache), before, strict=True))


def test_compact_moves_only_the_tail_rows_into_the_leavers_places() -> None:
    cache = random_cache(6, 9, seed=4)
    before = _snapshot(cache)
    storages = [_storage(layer) for layer in cache.growable_layers]
    cache.compact([0, 5, 2, 3])  # rows 1 and 4 leave; row 5 takes row 1's place
    assert cache.batch_size == 4 and cache.length == 9
    for layer, (keys, values), storage in zip(cache.growable_layers, before, storages, strict=True):
        assert _storage(layer) == storage  # in place: no new buffer
        assert layer.spare_rows == SPARE_ROWS + 2
        got_k, got_v = layer.used()
        assert torch.equal(got_k, keys[[0, 5, 2, 3]]) and torch.equal(got_v, values[[0, 5, 2, 3]])
        assert _zeros_past_length(layer)


def test_compact_refuses_an_order_that_would_overwrite_a_source() -> None:
    cache = random_cache(4, 5, seed=5)
    for order in ([1, 0], [0, 0], [0, 4], [2, 1, 0]):
        with pytest.raises(ValueError, match="not a keep-and-fill order"):
            cache.compact(order)
    assert cache.batch_size == 4


def test_join_in_place_fills_spare_rows_left_padded_with_zeros() -> None:
    cache = random_cache(5, 9, seed=6, roomy=False)
    cache.compact([0, 4, 2])  # 2 spare rows
    for layer in cache.growable_layers:  # a spare row's contents are undefined: say, an old row's later columns
        assert layer.keys is not None and layer.values is not None
        layer.keys[3:] = 1.0
        layer.values[3:] = 1.0
    running = _snapshot(cache)
    newcomer = random_cache(1, 4, seed=7)
    new = _snapshot(newcomer)
    storages = [_storage(layer) for layer in cache.growable_layers]
    assert cache.join_in_place([newcomer])
    assert cache.batch_size == 4 and cache.length == 9
    for layer, (keys, values), (nk, nv), storage in zip(cache.growable_layers, running, new, storages, strict=True):
        assert _storage(layer) == storage and layer.spare_rows == 1
        got_k, got_v = layer.used()
        # Hand-built reference: the newcomer left-padded by 5 zero columns under the running rows.
        assert torch.equal(got_k, torch.cat([keys, torch.cat([torch.zeros(1, 2, 5, 4), nk], dim=2)]))
        assert torch.equal(got_v, torch.cat([values, torch.cat([torch.zeros(1, 2, 5, 4), nv], dim=2)]))
        assert _zeros_past_length(layer)


def test_a_longer_newcomer_takes_columns_from_the_head_in_place() -> None:
    cache = random_cache(3, 6, seed=13)
    for layer in cache.growable_layers:  # the head's contents are undefined until taken: say, garbage
        assert layer._buffers is not None
        layer._buffers[0][:, :, : layer.head] = float("nan")
        layer._buffers[1][:, :, : layer.head] = float("nan")
    running = _snapshot(cache)
    newcomers = [random_cache(2, 10, seed=14), random_cache(1, 8, seed=15)]
    new = [_snapshot(c) for c in newcomers]
    storages = [_storage(layer) for layer in cache.growable_layers]
    assert cache.join_in_place(newcomers)
    assert cache.batch_size == 6 and cache.length == 10
    for index, layer in enumerate(cache.growable_layers):
        assert layer.keys is not None and layer.keys.untyped_storage().data_ptr() == storages[index]
        assert layer.head == HEAD_COLUMNS - 4 and layer.spare_rows == SPARE_ROWS - 3
        # Hand-built reference: the running rows get 4 zero columns on the left, the 8-column newcomer 2.
        expected = [
            torch.cat(
                [
                    torch.cat([torch.zeros(3, 2, 4, 4), running[index][which]], dim=2),
                    new[0][index][which],
                    torch.cat([torch.zeros(1, 2, 2, 4), new[1][index][which]], dim=2),
                ]
            )
            for which in (0, 1)
        ]
        assert torch.equal(layer.used()[0], expected[0]) and torch.equal(layer.used()[1], expected[1])
        assert _zeros_past_length(layer)
        step = torch.randn(6, 2, 1, 4)  # the next column lands after the used ones
        keys, _ = layer.update(step, step.clone())
        assert torch.equal(keys[:, :, :10], expected[0]) and torch.equal(keys[:, :, 10:], step)


def test_join_in_place_refuses_what_does_not_fit_and_changes_nothing() -> None:
    cache = random_cache(4, 6, seed=8, roomy=False)
    cache.compact([0, 3, 2])  # 1 spare row, no head
    roomy = random_cache(3, 6, seed=8)  # SPARE_ROWS spare rows, a head of HEAD_COLUMNS
    cases = [
        (cache, [random_cache(1, 7, seed=9)]),  # longer, no head
        (cache, [random_cache(2, 3, seed=10)]),  # more rows than spare
        (roomy, [random_cache(1, 6 + HEAD_COLUMNS + 1, seed=11)]),  # longer than the head allows
        (roomy, [random_cache(SPARE_ROWS + 1, 3, seed=12)]),
    ]
    for target, newcomers in cases:
        before, heads = _snapshot(target), [layer.head for layer in target.growable_layers]
        assert not target.join_in_place(newcomers)
        assert target.batch_size == before[0][0].shape[0] and target.length == 6
        assert [layer.head for layer in target.growable_layers] == heads
        assert all(torch.equal(a[0], b[0]) for a, b in zip(_snapshot(target), before, strict=True))


def test_drop_left_hands_padding_back_to_the_head_without_a_copy() -> None:
    cache = random_cache(3, 9, seed=16)
    before = _snapshot(cache)
    storages = [_storage(layer) for layer in cache.growable_layers]
    capacity = cache.growable_layers[0].capacity
    cache.drop_left(4)
    assert cache.length == 5
    for layer, (keys, values), storage in zip(cache.growable_layers, before, storages, strict=True):
        assert _storage(layer) == storage and layer.head == HEAD_COLUMNS + 4 and layer.capacity == capacity - 4
        assert torch.equal(layer.used()[0], keys[:, :, 4:]) and torch.equal(layer.used()[1], values[:, :, 4:])
        layer.extend_left(2)  # taken back: zeros, not the old columns
        assert torch.equal(layer.used()[0], torch.cat([torch.zeros(3, 2, 2, 4), keys[:, :, 4:]], dim=2))
    with pytest.raises(ValueError, match="drop_left: 8 columns of 7"):
        cache.growable_layers[0].drop_left(8)
    with pytest.raises(ValueError, match="extend_left"):
        cache.growable_layers[0].extend_left(HEAD_COLUMNS + 3)


@pytest.mark.parametrize("roomy", [True, False])
def test_after_compact_appends_and_growth_use_the_kept_rows_only(roomy: bool, nan_memory: None) -> None:
    cache = random_cache(4, 9, seed=11, roomy=roomy)
    cache.compact([3, 1])
    before = _snapshot(cache)
    layer = cache.growable_layers[0]
    capacity = layer.capacity
    step = torch.randn(2, 2, capacity - 9 + 1, 4)  # one column past the capacity: the buffer grows
    keys, _ = layer.update(step, step.clone())
    assert keys.shape == (2, 2, capacity + 1, 4) and layer.capacity > capacity
    assert (layer.spare_rows, layer.head) == ((SPARE_ROWS, HEAD_COLUMNS) if roomy else (0, 0))  # a new buffer's
    assert torch.equal(keys[:, :, :9], before[0][0]) and torch.equal(keys[:, :, 9:], step)
    assert _zeros_past_length(layer)
    with pytest.raises(ValueError, match="3 rows of keys for a cache of 2 rows"):
        layer.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))


def test_exact_buffers_hold_the_used_rows_only_and_stay_so(nan_memory: None) -> None:
    """From a roomy cache (fresh memory NaN here) to the compiled step's buffers: the used rows only, zeros past
    ``length``."""
    cache = random_cache(4, 6, seed=12)
    cache.compact([0, 3])
    cache.drop_left(1)
    before = _snapshot(cache)
    cache.exact_buffers()
    assert not cache.roomy
    for layer, (keys, values) in zip(cache.growable_layers, before, strict=True):
        assert layer.keys is not None and layer.values is not None
        assert layer.keys.shape[0] == 2 and layer.spare_rows == 0 and layer.head == 0 and layer.keys.is_contiguous()
        assert torch.equal(layer.used()[0], keys) and torch.equal(layer.used()[1], values)
        assert not layer.keys[:, :, 5:].any() and not layer.values[:, :, 5:].any()  # zeros, not NaN
        layer.reserve(layer.capacity + 1)  # growth keeps them exact
        assert layer.spare_rows == 0 and layer.head == 0 and torch.equal(layer.used()[0], keys)
        assert not layer.keys[:, :, 5:].any()
    compacted = random_cache(4, 6, seed=12, roomy=False)
    compacted.compact([0, 3])  # not roomy, but 2 spare rows: made exact too
    compacted.exact_buffers()
    assert all(layer.spare_rows == 0 for layer in compacted.growable_layers)


def test_exact_buffers_of_a_planned_buffer_take_its_ready_columns_only(nan_memory: None) -> None:
    """A roomy buffer planned far ahead (its columns past ``ready`` NaN here) becomes exact buffers of the ready
    columns: all defined, zeros past ``length``, not the whole plan."""
    cache = BatchKVCache(2)
    cache.plan(1000)
    reference = []
    for step in range(3):
        keys = torch.randn(2, 2, 7 if step == 0 else 1, 4)
        reference.append(keys)
        for layer in cache.growable_layers:
            layer.update(keys, keys + 1)
    layer = cache.growable_layers[0]
    assert layer.capacity == 1024 and layer.ready == GROWTH_CHUNK and torch.isnan(layer.keys[:2, :, -1]).all()
    cache.exact_buffers()
    expected = torch.cat(reference, dim=2)
    for layer in cache.growable_layers:
        assert layer.keys is not None and layer.values is not None
        assert layer.capacity == GROWTH_CHUNK and not layer.roomy and layer.ready == layer.capacity
        assert torch.equal(layer.keys[:, :, :9], expected) and torch.equal(layer.values[:, :, :9], expected + 1)
        assert not layer.keys[:, :, 9:].any() and not layer.values[:, :, 9:].any()


@pytest.mark.parametrize("device_has_room", [True, False])
def test_decoding_within_the_plan_never_grows_the_buffer(
    device_has_room: bool, nan_memory: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU a cache planned for its rows' budgets is allocated for them at once: 300 decode steps write into
    the same buffer (no growth copy), the keys equal the concatenated steps (an independent reference), and the
    columns from ``length`` to ``ready`` stay zeros while the rest of the plan is left unwritten (NaN here). On a
    device without room (a GPU), the buffer grows by chunks as before."""
    if not device_has_room:
        monkeypatch.setattr("server.engine.kv_cache._roomy_device", lambda device: False)
    cache = BatchKVCache(1)
    cache.plan(20 + 300)
    layer = cache.growable_layers[0]
    steps = [torch.randn(3, 2, 20, 4)] + [torch.randn(3, 2, 1, 4) for _ in range(300)]
    storages = set()
    capacities = set()  # a growth shows as a new capacity (a freed buffer's address may be reused by the next)
    for keys in steps:
        layer.update(keys, -keys)
        storages.add(_storage(layer))
        capacities.add(layer.capacity)
        assert _zeros_past_length(layer)
    assert layer.length == 320 and torch.equal(layer.used()[0], torch.cat(steps, dim=2))
    assert torch.equal(layer.used()[1], -torch.cat(steps, dim=2))
    if device_has_room:
        assert len(storages) == 1 and layer.capacity == 320 and layer.ready == 320
    else:
        assert len(capacities) > 3 and layer.ready == layer.capacity
    assert not torch.isnan(layer.used()[0]).any()


def test_a_plan_beyond_the_ahead_limit_is_capped_and_then_grows() -> None:
    layer = GrowableLayer()
    layer.planned = 100 + AHEAD_COLUMNS + 500
    like = torch.zeros(1, 1, 1, 2)
    layer.allocate(2, 100, 1, like, like)
    assert layer.capacity == 100 + AHEAD_COLUMNS + 28  # rounded up to a growth chunk
    assert layer.ready == 100 + GROWTH_CHUNK
    layer.reserve(layer.capacity + 1)  # past it: a growth (copy), planned columns again from there
    assert layer.capacity >= 100 + AHEAD_COLUMNS + 500


def test_the_plan_follows_the_columns_through_joins_and_copies() -> None:
    """The plan and the ready columns are in view columns: they move with the padding a join adds or a filter
    drops, and a join or a copy keeps the longest plan of its parts."""
    running, newcomer = random_cache(2, 10, seed=20), random_cache(1, 30, seed=21)
    running.plan(10 + 50)
    newcomer.plan(30 + 400)
    ready = running.growable_layers[0].ready
    assert running.join_in_place([newcomer])  # the running rows get 20 more columns of padding
    assert running.length == 30 and running.planned == 430 and running.growable_layers[0].ready == ready + 20
    running.drop_left(5)
    assert running.planned == 425 and running.growable_layers[0].ready == ready + 15
    assert all(_zeros_past_length(layer) for layer in running.growable_layers)
    copied = running.select(torch.tensor([0, 2]), 3, spare=1)
    assert copied.length == 22 and copied.planned == 422
    joined = BatchKVCache.concatenate([random_cache(1, 40, seed=22), copied], spare=1)
    assert joined.length == 40 and joined.planned == 440  # the second's plan, shifted by its 18 more columns
    assert all(layer.capacity >= 440 for layer in joined.growable_layers)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_room_costs_no_memory_until_used() -> None:
    """Independent of the cache's own accounting: the process's resident memory. Roomy buffers for 8 rows of 64
    used columns and 64 free ones (zeroed) in 30 layers (47 MB written) reserve 8 spare rows, 512 head columns and
    the columns of a plan 2,048 past the used ones (1.9 GB in all); only the written part may become
    resident."""
    gc.collect()
    like = torch.zeros(1, 3, 1, 64)
    start = _rss_bytes()
    layers = [GrowableLayer() for _ in range(30)]
    for layer in layers:
        layer.planned = 64 + AHEAD_COLUMNS
        layer.allocate(8, 64, 64, like, like)
        assert layer.keys is not None and layer.values is not None
        layer.keys[:8, :, :64] = 1.0  # what the caller fills
        layer.values[:8, :, :64] = 1.0
    used = 30 * 2 * 8 * 3 * 128 * 64 * 4  # layers × (keys, values) × rows × heads × columns × D × fp32
    reserved = sum(2 * layer._buffers[0].numel() * 4 for layer in layers if layer._buffers is not None)
    assert reserved > 40 * used
    assert _rss_bytes() - start < used + 8 * 2**20


def test_fill_order_keeps_rows_in_place_and_fills_holes_from_the_tail() -> None:
    assert fill_order([0, 2, 3, 5]) == [0, 5, 2, 3]
    assert fill_order([1, 2]) == [2, 1]
    assert fill_order([0, 1, 2]) == [0, 1, 2]
    assert fill_order([4, 5, 6]) == [4, 5, 6]
