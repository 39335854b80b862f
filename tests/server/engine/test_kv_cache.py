"""server/engine/kv_cache.py: rows joined and kept are copied exactly, padding and spare columns are zeros."""

from __future__ import annotations

import torch

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
