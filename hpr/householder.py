"""Householder Pseudo-Rotation: the math, in one file.

Per token activation ``x`` (h,) and one trained layer module:

1. probe      p = σ(w·x)                        (w: (h,), no bias; p ≥ 0.5 ⇒ already positive, untouched)
2. angle      θ = α · π · σ(MLP(x))             (MLP: h → h/2 → h/4 → h/8 → 1, GELU)
3. reflect    r = x − 2 (w·x)/(w·w) · w          O(h), never the h×h Householder matrix
4. rotate     x' = sin θ / sin γ · r + sin(γ − θ) / sin γ · x,   γ = ∠(x, r),   |x'| = |x|

Step 4 is evaluated in the equivalent, better-conditioned form x' = cos θ·x + sin θ·|x|·ŵ⊥ (ŵ⊥: the unit part
of w orthogonal to x), which is the same vector (r lies in span(x, w) on the w side when w·x < 0).

Everything is computed in float32 whatever the model dtype, except the probe's decision (the sign of w·x), which is
taken in float64 (:func:`probe_margin`): in float32 its rounding depends on how a kernel splits the sum, which
changes with the batch shape, so a token within rounding of the hyperplane could be rotated in one batch and not
in another. Tokens with sin γ ≈ 0 (x on the hyperplane, or parallel to w, or zero) are returned unchanged, so no
NaN/inf can come out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hpr.edit_module import EditResult

MAX_ALPHA = 4.0  # largest accepted edit strength (θ = α·π·σ(·) may then go round up to twice)

# Below this, γ is treated as 0 or π and the token is left alone: the rotation plane is undefined there.
SIN_GAMMA_EPS = 1e-6


def default_widths(hidden_size: int, num_layers: int = 4) -> list[int]:
    """The seed's angle-MLP widths: h, h/2, h/4, h/8 for 4 layers (the final → 1 is implicit)."""
    return [max(1, hidden_size // (2**i)) for i in range(num_layers)]


@dataclass(frozen=True)
class RotationResult:
    """Output of :func:`householder_rotate`. Shapes follow the input's leading dims ``(...)``."""

    output: Tensor  # (..., h) in the input dtype
    rotated: Tensor  # (...) bool: the token was changed
    theta: Tensor  # (...) float32: the applied angle (0 where not rotated)


def probe_margin(x: Tensor, w: Tensor) -> Tensor:
    """w·x per token in float64: (..., h), (h,) → (...). Negative means the probe says "edit".

    float32 inputs are exact in float64 and so are their products; only the sum rounds, at ~1e-16 relative, so the
    sign no longer depends on the summation order (batch shape, kernel, device) except for tokens within ~1e-13 of
    the hyperplane — far below the float32 rounding of the activations themselves. (float32 on MPS: no float64.)
    """
    if x.device.type == "mps":
        return x.float() @ w.float()
    return x.double() @ w.double()


def householder_rotate(
    x: Tensor, w: Tensor, theta: Tensor, edit_mask: Tensor | None = None, margin: Tensor | None = None
) -> RotationResult:
    """Rotate each ``x`` towards its reflection through the hyperplane ``w·x = 0`` by ``theta`` radians.

    Args:
        x: (..., h) activations, any float dtype.
        w: (h,) hyperplane normal (the probe weight).
        theta: (...) target angles in radians (already scaled by alpha).
        edit_mask: (...) bool, extra positions to leave untouched (False = keep). Combined with the probe rule.
        margin: (...) float64 ``probe_margin(x, w)`` when the caller already has it.

    Only tokens with ``w·x < 0`` (probe says negative, p < 0.5) are rotated, ``w·x`` taken in float64.
    """
    x32 = x.float()  # (..., h)
    w32 = w.float()  # (h,)
    wx64 = probe_margin(x32, w32) if margin is None else margin  # (...) float64: the decision
    wx = wx64.float()  # (...) float32: the geometry
    ww = torch.dot(w32, w32)  # ()
    xx = (x32 * x32).sum(-1)  # (...)
    tiny = torch.finfo(torch.float32).tiny
    # cos²φ between x and w. The angle γ = ∠(x, r) has sin γ = 2·sqrt(cos²φ·(1 − cos²φ)).
    c2 = ((wx * wx) / (ww * xx).clamp_min(tiny)).clamp(0.0, 1.0)
    sin_g = 2.0 * torch.sqrt(c2 * (1.0 - c2))
    rotate = (wx64 < 0) & (sin_g > SIN_GAMMA_EPS)
    if edit_mask is not None:
        rotate = rotate & edit_mask
    th = torch.where(rotate, theta.float(), torch.zeros_like(wx))  # (...)
    # sin θ/sin γ · r + sin(γ − θ)/sin γ · x, with r = x − 2(w·x)/(w·w)·w, equals (for w·x < 0)
    # cos θ · x + sin θ · |x| · w⊥/|w⊥|, w⊥ = w − (w·x)/(x·x)·x: the same rotation in the plane span(x, w),
    # without dividing by a small sin γ, so it stays accurate near the hyperplane.
    w_perp = w32 - (wx / xx.clamp_min(tiny)).unsqueeze(-1) * x32  # (..., h)
    perp_norm = w_perp.norm(dim=-1).clamp_min(tiny)  # (...)
    scale = torch.where(rotate, torch.sin(th) * torch.sqrt(xx) / perp_norm, torch.zeros_like(th))  # (...)
    out = torch.cos(th).unsqueeze(-1) * x32 + scale.unsqueeze(-1) * w_perp  # (..., h)
    out = torch.where(rotate.unsqueeze(-1), out, x32)
    return RotationResult(output=out.to(x.dtype), rotated=rotate, theta=th)


def angle_between(a: Tensor, b: Tensor) -> Tensor:
    """Angle in radians between the last-dim vectors of ``a`` and ``b`` (float32, in [0, π], 0 for zeros)."""
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(-1)
    cross = torch.sqrt(((a32 * a32).sum(-1) * (b32 * b32).sum(-1)).clamp_min(0.0))
    cos = torch.where(cross > 0, dot / cross.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(dot))
    return torch.arccos(cos.clamp(-1.0, 1.0))


class AngleMLP(nn.Module):
    """θ̂(x) = π·σ(MLP(x)): Linear/GELU stack over ``widths`` then a Linear to 1.

    ``self.model`` is an ``nn.Sequential`` whose Linear layers sit at even indices, as in the seed's checkpoints.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"angle MLP widths must be positive integers, got {list(widths)}")
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(widths[-1], 1))
        self.model = nn.Sequential(*layers)
        self.widths = [int(w) for w in widths]

    def logits(self, x: Tensor) -> Tensor:
        """(..., h) → (...) pre-sigmoid angle logits."""
        out: Tensor = self.model(x).squeeze(-1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """(..., h) → (...) angle in radians, in (0, π)."""
        return math.pi * torch.sigmoid(self.logits(x))


class HPRLayer(nn.Module):
    """The trained module for one decoder layer: probe (Linear h→1, no bias) + angle MLP."""

    def __init__(self, hidden_size: int, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = list(widths) if widths is not None else default_widths(hidden_size)
        if widths[0] != hidden_size:
            raise ValueError(f"angle MLP must start at the hidden size {hidden_size}, got widths {widths}")
        self.hidden_size = hidden_size
        self.probe = nn.Linear(hidden_size, 1, bias=False)
        self.angle = AngleMLP(widths)

    def probe_logits(self, x: Tensor) -> Tensor:
        """(..., h) → (...) logit of 'positive'."""
        out: Tensor = self.probe(x).squeeze(-1)
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(..., h) → (probe logits (...), angle (...)), as used in training."""
        return self.probe_logits(x), self.angle(x)

    def edit(self, x: Tensor, alpha: Tensor | float = 1.0, edit_mask: Tensor | None = None) -> EditResult:
        """Apply the pseudo-rotation to activations ``x`` (..., h) with strength ``alpha`` (scalar or (...)).

        The :class:`~hpr.edit_module.EditModule` contract: ``changed`` = rotated, ``amount`` = θ.
        """
        result = self.rotate(x, alpha, edit_mask)
        return EditResult(output=result.output, changed=result.rotated, amount=result.theta)

    def rotate(self, x: Tensor, alpha: Tensor | float = 1.0, edit_mask: Tensor | None = None) -> RotationResult:
        """:meth:`edit` with HPR's own names (``rotated``, ``theta``)."""
        w = self.probe.weight[0]
        x32 = x.float()
        margin = probe_margin(x32, w)  # (...) float64
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            # Gathering the candidates below would cost a device→host sync per layer on a GPU, and its
            # data-dependent shapes would break a compiled graph: every token gets an angle, θ = 0 where not rotated.
            return householder_rotate(x, w, self.angle(x32) * alpha, edit_mask, margin)
        # On CPU the angle MLP is most of the cost: run it only where a rotation can happen (probe says negative,
        # inside the mask). Other tokens get θ = 0 and householder_rotate leaves them unchanged anyway.
        candidates = margin < 0  # (...)
        if edit_mask is not None:
            candidates = candidates & edit_mask
        theta = torch.zeros(candidates.shape, dtype=torch.float32, device=x.device)  # (...)
        index = candidates.nonzero(as_tuple=True)
        if index[0].numel():
            scale = torch.as_tensor(alpha, dtype=torch.float32, device=x.device).expand(candidates.shape)
            theta[index] = self.angle(x32[index]) * scale[index]  # (k,)
        return householder_rotate(x, w, theta, edit_mask, margin)
