"""EditPlan statistics with values: an adapter built by hand rotates a known set of positions by a known angle.

The probe is ``e_j`` (it marks exactly the tokens whose coordinate j is negative) and the angle MLP outputs the
constant π·σ(b) (see tests/known_adapter.py), so ``tokens``, ``rotated`` and the angle sum are known from the
unedited model's hidden states (or from an independent float64 reference of the rotation) before the edit runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from hpr.editing import EditPlan, EditSpec, HPREditor
from tests.known_adapter import hidden_after, known_angle, make_known_adapter, reference_edit

MARGIN = 1e-3  # every counted |x_j| is at least this far from the hyperplane: float noise cannot move the count


def best_coordinate(candidates: Callable[[int], list[Tensor]], hidden: int) -> int:
    """The coordinate j whose values (one tensor per group) have both signs in every group and the largest margin."""
    best, best_margin = -1, 0.0
    for j in range(hidden):
        groups = candidates(j)
        if not all(bool((g < 0).any()) and bool((g >= 0).any()) for g in groups):
            continue
        margin = min(float(g.abs().min()) for g in groups)
        if margin > best_margin:
            best, best_margin = j, margin
    assert best >= 0 and best_margin > MARGIN, "no coordinate splits the tokens with a safe margin"
    return best


def test_stats_are_the_marked_positions_and_the_known_angle(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Row 0: scope all with two padding columns; row 1: no edit; row 2: scope generated (prompt of 6 tokens)."""
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    x1 = hidden_after(tiny_model, ids, 1)
    j = best_coordinate(lambda j: [x1[0, 2:, j], x1[2, 5:, j]], x1.shape[-1])
    editor = HPREditor(tiny_model, {"k": make_known_adapter(coordinate=j)})
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[0, :2] = False
    plan = EditPlan(
        [EditSpec("k", (1,), 0.5), None, EditSpec("k", (1,), 2.0, scope="generated")],
        prompt_lengths=[9, 9, 6],
        collect_stats=True,
        valid=valid,
    )
    try:
        with torch.no_grad(), editor.apply(plan):
            tiny_model(input_ids=ids)
    finally:
        editor.detach()
    row0, row1, row2 = (plan.row_stats(row) for row in range(3))
    rotated0 = int((x1[0, 2:, j] < 0).sum())
    rotated2 = int((x1[2, 5:, j] < 0).sum())
    assert 0 < rotated0 < 7 and 0 < rotated2 < 4
    assert (row0.layers[1].tokens, row0.layers[1].changed) == (7, rotated0)
    assert row0.layers[1].amount_sum == pytest.approx(rotated0 * known_angle(0.5), rel=1e-6)
    assert (row2.layers[1].tokens, row2.layers[1].changed) == (4, rotated2)
    assert row2.layers[1].mean_amount == pytest.approx(known_angle(2.0), rel=1e-6)
    assert row1.layers == {}  # the row without an edit
    assert list(row0.layers) == [1] and list(row2.layers) == [1]
    assert plan.sums is not None and plan.sums[:, [0, 2, 3]].abs().sum().item() == 0  # layers nobody edits


def test_stats_of_a_later_layer_see_the_earlier_edit(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Layers 1 and 3 edited: layer 3's probe reads activations the layer-1 edit changed. The expected count comes
    from the independent float64 reference applying the layer-1 rotation; the logits must match it too."""
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    alpha = 1.0
    theta = known_angle(alpha)

    def after_reference(j: int) -> tuple[Tensor, Tensor, Tensor]:
        """Layer 1's and layer 3's outputs as their probes see them (before their own edit), and the logits."""
        with reference_edit(tiny_model, 1, j, theta):
            x3 = hidden_after(tiny_model, ids, 3)  # after the layer-1 edit, before any layer-3 edit
            with reference_edit(tiny_model, 3, j, theta), torch.no_grad():
                logits = tiny_model(input_ids=ids).logits
        return hidden_after(tiny_model, ids, 1), x3, logits

    j = best_coordinate(lambda j: [h[0, :, j] for h in after_reference(j)[:2]], 64)
    x1, x3, ref_logits = after_reference(j)
    assert not torch.equal((x3[0, :, j] < 0), (hidden_after(tiny_model, ids, 3)[0, :, j] < 0)), (
        "pick ids where the layer-1 edit changes which tokens layer 3 marks"
    )
    editor = HPREditor(tiny_model, {"k": make_known_adapter(coordinate=j)})
    plan = EditPlan([EditSpec("k", (1, 3), alpha)], collect_stats=True)
    try:
        with torch.no_grad(), editor.apply(plan):
            logits = tiny_model(input_ids=ids).logits
    finally:
        editor.detach()
    stats = plan.row_stats(0).layers
    for layer, x in ((1, x1), (3, x3)):
        rotated = int((x[0, :, j] < 0).sum())
        assert (stats[layer].tokens, stats[layer].changed) == (12, rotated)
        assert stats[layer].mean_amount == pytest.approx(theta, rel=1e-6)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
