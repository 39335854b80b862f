"""Every layer's HPR module as one set of stacked (L, …) parameters, so one batched matmul trains all layers.

``StackedHPR`` holds, for L layers, the probe weights (L, h) and the angle MLP's weights (L, in, out) and biases
(L, out). Layer ``l`` of it computes exactly what ``hpr.householder.HPRLayer`` computes with the same numbers;
:meth:`StackedHPR.to_adapter` copies them into an :class:`hpr.checkpoint.HPRAdapter`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpr.checkpoint import HPRAdapter, HPRConfig


class StackedHPR(nn.Module):
    """Probes + angle MLPs of ``num_layers`` layers, initialised like ``nn.Linear`` (U(±1/√fan_in))."""

    def __init__(self, num_layers: int, widths: Sequence[int], generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.widths = [int(w) for w in widths]
        h = self.widths[0]
        dims = [*self.widths, 1]

        def uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator))

        self.probe = uniform((num_layers, h), h)  # (L, h)
        self.weights = nn.ParameterList([uniform((num_layers, a, b), a) for a, b in itertools.pairwise(dims)])
        self.biases = nn.ParameterList([uniform((num_layers, b), a) for a, b in itertools.pairwise(dims)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (L, N, h) float32 → (probe logits (L, N), angle in radians (L, N))."""
        logits = torch.einsum("lnh,lh->ln", x, self.probe)  # (L, N)
        z = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = torch.baddbmm(b.unsqueeze(1), z, w)  # (L, N, out)
            if i < last:
                z = F.gelu(z)
        angle = math.pi * torch.sigmoid(z.squeeze(-1))  # (L, N)
        return logits, angle

    def probe_logits(self, x: Tensor) -> Tensor:
        """x (L, N, h) → (L, N)."""
        return torch.einsum("lnh,lh->ln", x, self.probe)

    def layer_state(self, index: int) -> dict[str, Tensor]:
        """Layer ``index``'s parameters, keyed like ``HPRLayer.state_dict()`` (nn.Linear weights are (out, in))."""
        state = {"probe.weight": self.probe[index].detach().clone().unsqueeze(0)}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            state[f"angle.model.{2 * i}.weight"] = w[index].detach().t().contiguous().clone()
            state[f"angle.model.{2 * i}.bias"] = b[index].detach().clone()
        return state

    def to_adapter(self, config: HPRConfig, states: dict[int, dict[str, Tensor]] | None = None) -> HPRAdapter:
        """An adapter with a module for each of ``config.layers`` (stack index = layer), from ``states`` if given."""
        adapter = HPRAdapter(config, name="hpr")
        for layer in config.layers:
            state = states[layer] if states is not None else self.layer_state(layer)
            adapter.layer(layer).load_state_dict(state)
        return adapter.eval().requires_grad_(False)
