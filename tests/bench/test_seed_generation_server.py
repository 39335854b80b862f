"""The seed-path baseline must compute the same HPR edit as ours (only slower), or the ≥ 20× figure is meaningless."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hpr.checkpoint import HPRAdapter
from hpr.decoder_layers import capture_layer_outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from seed_generation_server import SeedLastTokenEdit, householder_matrix, seed_apply_guidance


def test_householder_matrix_reflects_through_the_probe_hyperplane() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 16)
    h = householder_matrix(w)
    x = torch.randn(5, 16)
    expected = x - 2 * (x @ w.T) / (w @ w.T) * w
    torch.testing.assert_close(x @ h, expected, rtol=1e-5, atol=1e-5)


def test_seed_edit_equals_our_o_h_edit(tiny_adapter: HPRAdapter) -> None:
    torch.manual_seed(1)
    module = tiny_adapter.layer(0)
    x = torch.randn(6, 1, 64) * 4  # (b, s=1, h): the seed edits one position per forward
    ours = module.rotate(x, alpha=0.7)
    assert ours.rotated.any() and not ours.rotated.all()  # both branches are exercised
    torch.testing.assert_close(seed_apply_guidance(module, x, 0.7), ours.output, rtol=1e-4, atol=1e-4)


def test_seed_hook_edits_only_the_last_position(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([[5, 9, 11, 3, 7, 20]])
    with torch.inference_mode(), capture_layer_outputs(tiny_model, [1]) as plain:
        tiny_model(input_ids=ids, use_cache=False)
    hook = SeedLastTokenEdit(tiny_model, tiny_adapter, [1], alpha=1.0)
    try:
        with torch.inference_mode(), capture_layer_outputs(tiny_model, [1]) as edited:
            tiny_model(input_ids=ids, use_cache=False)
    finally:
        for handle in hook.handles:
            handle.remove()
    before, after = plain[1], edited[1]  # (1, T, h)
    torch.testing.assert_close(after[:, :-1], before[:, :-1])
    expected = tiny_adapter.layer(1).edit(before[:, -1:]).output
    torch.testing.assert_close(after[:, -1:], expected, rtol=1e-4, atol=1e-4)
