"""Per-request edit statistics: one typed record, made here and passed through the engine and the server as is.

While a request runs, its sums stay on the device (:class:`EditStatsCounter`: no host sync per forward pass);
:meth:`EditStatsCounter.result` reads them once, at the end, into an :class:`EditStats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The accumulators per (row, layer), in this order, in EditPlan's sums tensor (..., len(SUMS)).
SUMS = ("tokens", "changed", "amount")


@dataclass(frozen=True)
class LayerEditStats:
    """One decoder layer of one request, summed over every forward pass."""

    tokens: int  # positions the edit looked at (scope and padding applied)
    changed: int  # of those, positions the method changed (HPR: judged negative by the probe, and rotated)
    amount_sum: float  # radians, summed over changed positions (HPR: θ; steering: ∠(x, x'))

    @property
    def share_changed(self) -> float:
        return self.changed / self.tokens if self.tokens else 0.0

    @property
    def mean_amount(self) -> float:
        """Mean radians over changed positions (0 when none)."""
        return self.amount_sum / self.changed if self.changed else 0.0


@dataclass(frozen=True)
class EditStats:
    """A request's statistics for each layer its edit covers (every one listed, 0s where nothing was seen)."""

    layers: Mapping[int, LayerEditStats]

    @classmethod
    def from_sums(cls, sums: Tensor | None, layers: Sequence[int]) -> EditStats:
        """``sums`` (num_layers, len(SUMS)) → the record for ``layers`` (one host sync). None = nothing seen."""
        values = sums.tolist() if sums is not None else None
        out: dict[int, LayerEditStats] = {}
        for layer in layers:
            tokens, changed, amount = values[layer] if values is not None else (0.0, 0.0, 0.0)
            out[layer] = LayerEditStats(tokens=round(tokens), changed=round(changed), amount_sum=float(amount))
        return cls(layers=out)


class EditStatsCounter:
    """One request's running sums over the forward passes it takes part in, kept on the device."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = tuple(layers)
        self._sums: Tensor | None = None  # (num_layers, len(SUMS)) float32

    def add(self, sums: Tensor) -> None:
        """Add one forward pass's (or several's) sums (num_layers, len(SUMS)) of this request's row."""
        self._sums = sums.clone() if self._sums is None else self._sums + sums

    def reset(self) -> None:
        """Forget everything counted so far (a prefill about to run again from its first token)."""
        self._sums = None

    def result(self) -> EditStats:
        """The statistics so far, read to the host once."""
        return EditStats.from_sums(self._sums, self.layers)


def empty_sums(rows: int, num_layers: int, device: torch.device) -> Tensor:
    """Zeroed accumulators (rows, num_layers, len(SUMS)) float32."""
    return torch.zeros((rows, num_layers, len(SUMS)), dtype=torch.float32, device=device)
