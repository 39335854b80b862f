"""Adapters whose edits are known in advance, built by hand, and an independent reference of the rotation.

:func:`make_known_adapter`: every layer's probe is the unit vector ``e_j`` (so it says "edit" exactly on the tokens
whose coordinate ``j`` is negative) and its angle MLP has all weights 0 and a last bias ``angle_logit`` (so it
outputs θ̂ = π·σ(angle_logit) for every token). A request at strength α then rotates a known set of positions by
the known angle α·π·σ(angle_logit).

:func:`reference_rotation` is the design's sin-ratio formula in float64, written from the paper, not from
``hpr.householder`` (which uses an equivalent but different form); :func:`reference_edit` applies it to a
block's output with a plain forward hook, and :func:`hidden_after` reads a block's output (llama-style models).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hpr.checkpoint import HPRAdapter, HPRConfig


def make_known_adapter(
    hidden: int = 64,
    num_layers: int = 4,
    coordinate: int = 0,
    angle_logit: float = math.log(3.0),  # σ = 0.75: θ̂ = 0.75·π
    base_model: str = "tiny-llama",
) -> HPRAdapter:
    """Every layer trained; selected: all of them."""
    layers = list(range(num_layers))
    config = HPRConfig(
        base_model=base_model, hidden_size=hidden, num_layers=num_layers, layers=layers, selected_layers=layers
    )
    adapter = HPRAdapter(config, name="known")
    with torch.no_grad():
        for layer in layers:
            module = adapter.layer(layer)
            module.probe.weight.zero_()
            module.probe.weight[0, coordinate] = 1.0
            for p in module.angle.parameters():
                p.zero_()
            last = module.angle.model[-1]
            assert isinstance(last, torch.nn.Linear)
            last.bias.fill_(angle_logit)
    return adapter.eval().requires_grad_(False)


def known_angle(alpha: float, angle_logit: float = math.log(3.0)) -> float:
    """The angle every rotated token gets: α·π·σ(angle_logit), radians."""
    return alpha * math.pi / (1.0 + math.exp(-angle_logit))


def reference_rotation(x: Tensor, w: Tensor, theta: float) -> Tensor:
    """x' = sin θ / sin γ · r + sin(γ − θ) / sin γ · x, r = x − 2 (w·x)/(w·w) · w, γ = ∠(x, r); x (h,), float64."""
    x64, w64 = x.double(), w.double()
    r = x64 - 2 * (x64 @ w64) / (w64 @ w64) * w64
    gamma = math.acos(max(-1.0, min(1.0, float(x64 @ r / (x64.norm() * r.norm())))))
    return (math.sin(theta) * r + math.sin(gamma - theta) * x64) / math.sin(gamma)


@contextmanager
def reference_edit(model: nn.Module, layer: int, j: int, theta: float, start: int = 0) -> Iterator[None]:
    """Edit block ``layer``'s output with :func:`reference_rotation` where coordinate j is negative, at positions
    ≥ ``start`` (no hpr code)."""
    block = model.model.layers[layer]  # type: ignore[index, union-attr]

    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        edited = hidden.clone()
        w = torch.zeros(hidden.shape[-1], dtype=torch.float64)
        w[j] = 1.0
        for b, t in (hidden[..., j] < 0).nonzero().tolist():
            if t < start:
                continue
            edited[b, t] = reference_rotation(hidden[b, t], w, theta).to(hidden.dtype)
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hidden_after(model: nn.Module, ids: Tensor, layer: int) -> Tensor:
    """(B, T, h) output of decoder block ``layer`` as hooks registered before this call leave it."""
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        captured.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handle = model.model.layers[layer].register_forward_hook(hook)  # type: ignore[index, union-attr]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return captured[0]
