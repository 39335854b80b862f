"""The additive steering vector (method ``steer``): its math, and that it plugs into the hooks like HPR does."""

from __future__ import annotations

import math

import pytest
import torch

from hpr.editing import EditPlan, EditSpec, HPREditor
from hpr.householder import angle_between
from hpr.methods import get_method, method_names
from hpr.steering import SteeringVector
from tests.conftest import make_random_adapter, make_steering_adapter


def test_edit_adds_alpha_times_the_vector_on_masked_positions_only() -> None:
    module = SteeringVector(4)
    with torch.no_grad():
        module.vector.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    x = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]])  # (1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    result = module.edit(x, torch.tensor([[2.0]]), mask)
    assert result.output[0, 0].tolist() == [2.0, 1.0, 0.0, 0.0]
    assert result.output[0, 1].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert torch.equal(result.output[0, 2], x[0, 2])  # outside the mask: the input itself
    assert result.changed.tolist() == [[True, True, False]]
    expected = [math.atan2(2.0, 1.0), math.atan2(2.0, 2.0), 0.0]  # the angle x → x'
    assert result.amount[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_alpha_zero_changes_nothing_and_bf16_stays_bf16() -> None:
    torch.manual_seed(0)
    module = SteeringVector(16).requires_grad_(False)
    module.vector.normal_()
    x = torch.randn(2, 5, 16)
    result = module.edit(x, 0.0)
    assert torch.equal(result.output, x) and not bool(result.changed.any()) and float(result.amount.abs().sum()) == 0
    half = module.edit(x.bfloat16(), 1.0)
    assert half.output.dtype == torch.bfloat16 and half.amount.dtype == torch.float32
    torch.testing.assert_close(half.output.float(), x + module.vector, atol=0.05, rtol=0.02)
    torch.testing.assert_close(half.amount, angle_between(x, x + module.vector), atol=1e-2, rtol=1e-2)


def test_methods_registry_builds_each_method() -> None:
    assert method_names() == ["hpr", "steer"]
    assert type(make_steering_adapter().layer(0)) is SteeringVector
    assert type(make_random_adapter().layer(0)).__name__ == "HPRLayer"
    assert get_method("steer").name == "steer"


def test_hpr_and_steering_rows_share_one_forward_pass(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Three rows: HPR, steering, none. Each edited row equals that row edited alone; the unedited one is exact;
    stats come from each method's own EditResult."""
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    editor = HPREditor(tiny_model, {"h": make_random_adapter(), "s": make_steering_adapter()})
    specs = [EditSpec("h", (0, 2), 1.0), EditSpec("s", (1,), 0.5), None]
    try:
        with torch.no_grad():
            base = tiny_model(input_ids=ids).logits
            plan = EditPlan(specs, collect_stats=True)
            with editor.apply(plan):
                together = tiny_model(input_ids=ids).logits
            alone = []
            for row, spec in enumerate(specs):
                with editor.apply(EditPlan([spec])):
                    alone.append(tiny_model(input_ids=ids[row : row + 1]).logits[0])
    finally:
        editor.detach()
    assert torch.equal(together[2], base[2])
    for row in (0, 1):
        torch.testing.assert_close(together[row], alone[row], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(together[row], base[row], atol=1e-3)
    steer = plan.row_stats(1).layers[1]
    assert steer.tokens == 7 and steer.changed == 7 and 0 < steer.mean_amount < math.pi  # every position shifted
    hpr = plan.row_stats(0).layers
    assert set(hpr) == {0, 2} and all(s.tokens == 7 and 0 <= s.changed <= 7 for s in hpr.values())
