"""Fitting: stacked layers compute what HPRLayer computes, training is deterministic and learns a probe."""

from __future__ import annotations

import math

import torch

from hpr.checkpoint import HPRConfig
from hpr.householder import default_widths
from trainer.fit import FitOptions, fit
from trainer.pairs import PairSet
from trainer.stacked import StackedHPR


def synthetic_pairs(seed: int, pairs: int = 48, layers: int = 3, hidden: int = 16, length: int = 3) -> PairSet:
    """Positive tokens lean along +e0, negatives along −e0; each pair has ``length`` aligned positions."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs * length
    acts = torch.randn(rows, layers, hidden, generator=g)
    pos_rows = torch.arange(pairs * length)
    neg_rows = pos_rows + pairs * length
    acts[pos_rows, :, 0] += 3.0
    acts[neg_rows, :, 0] -= 3.0
    offsets = torch.arange(pairs + 1) * length
    questions = torch.arange(pairs) // 4
    return PairSet(acts, pos_rows, neg_rows, offsets, questions)


def test_stacked_layer_matches_hpr_layer_after_export() -> None:
    model = StackedHPR(3, default_widths(16), generator=torch.Generator().manual_seed(0))
    config = HPRConfig(base_model="t", hidden_size=16, num_layers=3, layers=[0, 1, 2])
    adapter = model.to_adapter(config)
    x = torch.randn(3, 5, 16)
    logits, angle = model(x)
    for layer in range(3):
        ref_logits, ref_angle = adapter.layer(layer)(x[layer])
        assert torch.allclose(logits[layer], ref_logits, atol=1e-5)
        assert torch.allclose(angle[layer], ref_angle, atol=1e-5)
    assert bool((angle > 0).all() and (angle < math.pi).all())


def test_fit_is_deterministic_under_a_seed() -> None:
    data = synthetic_pairs(0)
    options = FitOptions(epochs=2, batch_pairs=8, seed=7)
    a = fit(data, data, options, progress=False)
    b = fit(data, data, options, progress=False)
    for layer in range(data.num_layers):
        for key, value in a.best_states[layer].items():
            assert torch.equal(value, b.best_states[layer][key]), key
    c = fit(data, data, FitOptions(epochs=2, batch_pairs=8, seed=8), progress=False)
    assert not torch.equal(a.best_states[0]["probe.weight"], c.best_states[0]["probe.weight"])


def test_fit_learns_a_separating_probe_and_keeps_each_layers_best_epoch() -> None:
    train, held_out = synthetic_pairs(0), synthetic_pairs(1)
    result = fit(train, held_out, FitOptions(epochs=4, batch_pairs=8, lr=5e-2, shuffle="pairs"), progress=False)
    assert min(result.eval_accuracy.values()) > 0.9
    for layer, acc in result.eval_accuracy.items():
        epoch = result.best_epoch[layer]
        assert acc == max(h["eval_probe_accuracy"][layer] for h in result.history)
        assert result.history[epoch - 1]["eval_probe_accuracy"][layer] == acc
    losses = [sum(h["train_loss"]) for h in result.history]
    assert losses[-1] < losses[0]


def test_batches_cover_every_pair_once_per_epoch() -> None:
    data = synthetic_pairs(0, pairs=30)
    for shuffle in ("questions", "pairs"):
        batches = data.batches(8, torch.Generator().manual_seed(0), shuffle)
        assert sorted(torch.cat(batches).tolist()) == list(range(30))
        assert max(len(b) for b in batches) == 8
    batch = data.batch(torch.tensor([0, 1]))
    assert batch.x.shape == (3, 12, 16) and batch.pos.shape == (6,) and batch.neg.shape == (6,)
