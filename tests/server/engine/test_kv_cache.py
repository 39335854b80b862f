"""server/engine/kv_cache.py: rows joined and kept are copied exactly, padding and spare columns are zeros."""

from __future__ import annotations

import pytest
import torch

from server.engine.batch import fill_order
from server.engine.kv_cache import BatchKVCache, _runs


def random_cache(rows: int, length: int, layers: int = 3, seed: int = 0) -> BatchKVCache:
    generator = torch.Generator().manual_seed(seed)
    cache = BatchKVCache(layers)
    for layer in cache.growable_layers:
        keys = torch.randn(rows, 2, length, 4, generator=generator)
        layer.set_used(keys, torch.randn(rows, 2, length, 4, generator=generator), spare=5)
    return cache


def test_runs_group_consecutive_rows() -> None:
    assert _runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
    assert _runs([3, 2]) == [(3, 1), (2, 1)]  # order is kept: a row may move
    assert _runs([]) == []


def test_concatenate_left_pads_with_zeros_and_keeps_every_value() -> None:
    a, b = random_cache(3, 7, seed=1), random_cache(2, 4, seed=2)
    joined = BatchKVCache.concatenate([a, b], spare=6)
    assert joined.length == 7 and joined.batch_size == 5
    for index, layer in enumerate(joined.growable_layers):
        for name in ("keys", "values"):
            got = getattr(layer, name)
            ka = getattr(a.growable_layers[index], name)[:, :, :7]
            kb = getattr(b.growable_layers[index], name)[:, :, :4]
            # Reference built by hand: b left-padded by 3 zero columns, rows stacked.
            expected = torch.cat([ka, torch.cat([torch.zeros(2, 2, 3, 4), kb], dim=2)])
            assert torch.equal(got[:, :, :7], expected)
            assert got.shape[2] >= 7 + 6 and not got[:, :, 7:].any()  # spare columns: zeros


def test_select_keeps_rows_in_order_drops_columns_and_leaves_the_source_unchanged() -> None:
    cache = random_cache(6, 9, seed=3)
    before = [layer.keys.clone() for layer in cache.growable_layers if layer.keys is not None]
    rows = torch.tensor([4, 0, 1, 2, 5])
    kept = cache.select(rows, drop_columns=2, spare=3)
    assert kept.length == 7 and kept.batch_size == 5
    for index, layer in enumerate(kept.growable_layers):
        source = cache.growable_layers[index]
        assert source.keys is not None and source.values is not None and layer.values is not None
        for got, src in ((layer.keys, source.keys), (layer.values, source.values)):
            assert got is not None
            expected = torch.stack([src[r, :, 2:9] for r in [4, 0, 1, 2, 5]])
            assert torch.equal(got[:, :, :7], expected)
            assert got.shape[2] >= 7 + 3 and not got[:, :, 7:].any()
        assert torch.equal(source.keys, before[index])


def _snapshot(cache: BatchKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's used keys and values, copied: the reference the in-place operations are checked against."""
    return [(k.clone(), v.clone()) for k, v in (layer.used() for layer in cache.growable_layers)]


def test_compact_moves_only_the_tail_rows_into_the_leavers_places() -> None:
    cache = random_cache(6, 9, seed=4)
    before = _snapshot(cache)
    buffers = [layer.keys for layer in cache.growable_layers]
    cache.compact([0, 5, 2, 3])  # rows 1 and 4 leave; row 5 takes row 1's place
    assert cache.batch_size == 4 and cache.length == 9
    for layer, (keys, values), buffer in zip(cache.growable_layers, before, buffers, strict=True):
        assert layer.keys is buffer  # in place: no new buffer
        assert layer.spare_rows == 2
        got_k, got_v = layer.used()
        assert torch.equal(got_k, keys[[0, 5, 2, 3]]) and torch.equal(got_v, values[[0, 5, 2, 3]])
        assert not layer.keys[:4, :, 9:].any()  # a used row's spare columns stay zeros


def test_compact_refuses_an_order_that_would_overwrite_a_source() -> None:
    cache = random_cache(4, 5, seed=5)
    for order in ([1, 0], [0, 0], [0, 4], [2, 1, 0]):
        with pytest.raises(ValueError, match="not a keep-and-fill order"):
            cache.compact(order)
    assert cache.batch_size == 4


def test_join_in_place_fills_spare_rows_left_padded_with_zeros() -> None:
    cache = random_cache(5, 9, seed=6)
    cache.compact([0, 4, 2])  # 2 spare rows
    for layer in cache.growable_layers:  # a spare row's contents are undefined: say, an old row's later columns
        assert layer.keys is not None and layer.values is not None
        layer.keys[3:] = 1.0
        layer.values[3:] = 1.0
    running = _snapshot(cache)
    newcomer = random_cache(1, 4, seed=7)
    new = _snapshot(newcomer)
    buffers = [layer.keys for layer in cache.growable_layers]
    assert cache.join_in_place([newcomer])
    assert cache.batch_size == 4 and cache.length == 9
    for layer, (keys, values), (nk, nv), buffer in zip(cache.growable_layers, running, new, buffers, strict=True):
        assert layer.keys is buffer and layer.spare_rows == 1
        got_k, got_v = layer.used()
        # Hand-built reference: the newcomer left-padded by 5 zero columns under the running rows.
        assert torch.equal(got_k, torch.cat([keys, torch.cat([torch.zeros(1, 2, 5, 4), nk], dim=2)]))
        assert torch.equal(got_v, torch.cat([values, torch.cat([torch.zeros(1, 2, 5, 4), nv], dim=2)]))
        assert not layer.keys[3, :, 9:].any() and not layer.values[3, :, 9:].any()


def test_join_in_place_refuses_what_does_not_fit_and_changes_nothing() -> None:
    cache = random_cache(4, 6, seed=8)
    cache.compact([0, 3, 2])  # 1 spare row
    before = _snapshot(cache)
    for newcomers in ([random_cache(1, 7, seed=9)], [random_cache(2, 3, seed=10)]):  # longer; too many rows
        assert not cache.join_in_place(newcomers)
        assert cache.batch_size == 3
        assert all(torch.equal(a[0], b[0]) for a, b in zip(_snapshot(cache), before, strict=True))


def test_after_compact_appends_and_growth_use_the_kept_rows_only() -> None:
    cache = random_cache(4, 9, seed=11)
    cache.compact([3, 1])
    before = _snapshot(cache)
    layer = cache.growable_layers[0]
    capacity = layer.capacity
    step = torch.randn(2, 2, capacity - 9 + 1, 4)  # one column past the capacity: the buffer grows
    keys, _ = layer.update(step, step.clone())
    assert keys.shape == (2, 2, capacity + 1, 4) and layer.spare_rows == 0
    assert torch.equal(keys[:, :, :9], before[0][0]) and torch.equal(keys[:, :, 9:], step)
    with pytest.raises(ValueError, match="3 rows of keys for a cache of 2 rows"):
        layer.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))


def test_without_spare_rows_gives_buffers_of_the_used_rows() -> None:
    cache = random_cache(4, 6, seed=12)
    cache.compact([0, 3])
    before = _snapshot(cache)
    cache.without_spare_rows()
    for layer, (keys, _values) in zip(cache.growable_layers, before, strict=True):
        assert layer.keys is not None and layer.keys.shape[0] == 2 and layer.spare_rows == 0
        assert torch.equal(layer.used()[0], keys)


def test_fill_order_keeps_rows_in_place_and_fills_holes_from_the_tail() -> None:
    assert fill_order([0, 2, 3, 5]) == [0, 5, 2, 3]
    assert fill_order([1, 2]) == [2, 1]
    assert fill_order([0, 1, 2]) == [0, 1, 2]
    assert fill_order([4, 5, 6]) == [4, 5, 6]
