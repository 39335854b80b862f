"""The rotation math against a naive reference built from the paper's formulas with explicit matrices."""

from __future__ import annotations

import math

import pytest
import torch

from hpr.householder import HPRLayer, angle_between, default_widths, householder_rotate


def naive_hpr(x: torch.Tensor, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Paper/seed formulation: explicit h×h Householder matrix, float64, per token."""
    x, w, theta = x.double(), w.double(), theta.double()
    h = x.shape[-1]
    householder = torch.eye(h, dtype=torch.float64) - 2 * torch.outer(w, w) / (w @ w)
    out = x.clone()
    for i in range(x.shape[0]):
        xi = x[i]
        p = torch.sigmoid(w @ xi)
        if p >= 0.5:
            continue
        r = householder @ xi
        gamma = torch.arccos(torch.clamp((xi @ r) / (xi.norm() * r.norm()), -1, 1))
        out[i] = torch.sin(theta[i]) / torch.sin(gamma) * r + torch.sin(gamma - theta[i]) / torch.sin(gamma) * xi
    return out


def test_matches_naive_reference() -> None:
    torch.manual_seed(0)
    h = 48
    x = torch.randn(200, h)
    w = torch.randn(h)
    theta = torch.rand(200) * math.pi
    ours = householder_rotate(x, w, theta).output
    ref = naive_hpr(x, w, theta).float()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_norm_is_kept_and_positive_tokens_untouched() -> None:
    torch.manual_seed(1)
    x = torch.randn(500, 32)
    w = torch.randn(32)
    theta = torch.rand(500) * math.pi * 2
    res = householder_rotate(x, w, theta)
    assert torch.allclose(res.output.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    positive = (x @ w) >= 0
    assert torch.equal(res.output[positive], x[positive])
    assert bool(res.rotated[~positive].all())


def test_theta_equal_gamma_gives_reflection() -> None:
    torch.manual_seed(2)
    x = torch.randn(10, 16)
    w = torch.randn(16)
    x = torch.where(((x @ w) < 0).unsqueeze(-1), x, -x)  # all negative
    r = x - 2 * ((x @ w) / (w @ w)).unsqueeze(-1) * w
    gamma = angle_between(x, r)
    assert torch.allclose(householder_rotate(x, w, gamma).output, r, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_degenerate_inputs_stay_finite(dtype: torch.dtype) -> None:
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    huge = torch.finfo(dtype).max / 4
    x = torch.stack(
        [
            torch.zeros(4),  # zero
            torch.tensor([0.0, 1.0, 2.0, 3.0]),  # on the hyperplane
            torch.tensor([-3.0, 0.0, 0.0, 0.0]),  # anti-parallel to the normal (γ = π)
            torch.tensor([-1e-30, 1.0, 0.0, 0.0]),  # almost on the hyperplane
            torch.tensor([-huge, 1.0, 0.0, 0.0]),  # huge
        ]
    ).to(dtype)
    theta = torch.full((5,), 1.0)
    res = householder_rotate(x, w, theta)
    assert res.output.dtype == dtype
    assert torch.isfinite(res.output).all()
    assert torch.equal(res.output[:3], x[:3])  # unchanged where sin γ ≈ 0
    zero_w = householder_rotate(x.float(), torch.zeros(4), theta)
    assert torch.isfinite(zero_w.output).all()


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(3)
    layer = HPRLayer(64)
    x = torch.randn(2, 7, 64)
    out32 = layer.edit(x).output
    out16 = layer.edit(x.bfloat16()).output
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.float(), out32, atol=0.1, rtol=0.05)


def test_alpha_scales_angle_and_zero_alpha_is_identity() -> None:
    torch.manual_seed(4)
    layer = HPRLayer(32)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(layer.edit(x, alpha=0.0).output, x, atol=1e-6)
    t1 = layer.rotate(x, alpha=1.0).theta
    t2 = layer.rotate(x, alpha=2.0).theta
    assert torch.allclose(t2, 2 * t1, atol=1e-6)


def test_default_widths_follow_the_seed() -> None:
    assert default_widths(576) == [576, 288, 144, 72]
    layer = HPRLayer(576)
    linear_keys = sorted(k for k in layer.angle.state_dict() if k.endswith("weight"))
    assert linear_keys == ["model.0.weight", "model.2.weight", "model.4.weight", "model.6.weight"]


def near_hyperplane(n: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h) float32 tokens within ~1e-7..1e-3 of the hyperplane of a random w (h,), on both sides."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, generator=g)
    v = torch.randn(n, h, generator=g, dtype=torch.float64)
    v -= (v @ w.double())[:, None] / (w.double() @ w.double()) * w.double()  # on the hyperplane (in float64)
    offsets = torch.logspace(-7, -3, n, dtype=torch.float64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    return (v + offsets[:, None] * w.double() / w.double().norm()).float(), w


def exact_sign(x: torch.Tensor, w: torch.Tensor) -> list[bool]:
    """Whether w·x < 0, summed exactly (rationals) from the float32 values: the independent reference."""
    from fractions import Fraction

    out = []
    for row in x.tolist():
        total = sum((Fraction(a) * Fraction(b) for a, b in zip(row, w.tolist(), strict=True)), Fraction(0))
        out.append(total < 0)
    return out


def test_probe_decision_is_exact_and_independent_of_the_batch() -> None:
    """Tokens within float32 rounding of the hyperplane: the float64 margin's sign is the exact one, and a token
    gets the same decision alone, in a batch, or gathered among others (what batched serving relies on)."""
    from hpr.householder import probe_margin

    x, w = near_hyperplane(64, 576, seed=0)
    exact = exact_sign(x, w)
    assert 0 < sum(exact) < len(exact)
    batched = (probe_margin(x, w) < 0).tolist()
    assert batched == exact
    assert [bool(probe_margin(x[i : i + 1], w)[0] < 0) for i in range(len(x))] == exact
    assert (probe_margin(x.view(8, 8, 576), w) < 0).flatten().tolist() == exact
    layer = HPRLayer(576)
    with torch.no_grad():
        layer.probe.weight.copy_(w[None])
    rotated = layer.rotate(x, 1.0).rotated.tolist()  # most of these are inside the sin γ ≈ 0 band: left alone
    assert all(negative for negative, r in zip(exact, rotated, strict=True) if r)
