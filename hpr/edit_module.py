"""The contract every edit method implements: one module per decoder layer that edits activations.

An :class:`EditModule` takes activations ``x`` (..., h), a strength ``alpha`` and a mask of the positions it may
touch, and returns an :class:`EditResult`: the new activations, which positions it changed, and by how much (an
angle in radians: HPR's rotation angle θ, a steering vector's angle between the activation before and after).
The hook machinery (:mod:`hpr.editing`) and the statistics (:mod:`hpr.edit_stats`) read nothing else, so a new
method (:mod:`hpr.methods`) needs no change there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class EditResult:
    """What one edit did. Shapes follow the input's leading dims ``(...)``."""

    output: Tensor  # (..., h) in the input dtype; unchanged positions are bit-identical to the input
    changed: Tensor  # (...) bool: the position was edited
    amount: Tensor  # (...) float32: radians the edit turned x by (HPR: θ, up to α·π; 0 where unchanged)


class EditModule(Protocol):
    """One decoder layer's trained edit. ``alpha`` is a scalar or broadcasts against ``(...)``, e.g. (n, 1)."""

    def edit(self, x: Tensor, alpha: Tensor | float = 1.0, edit_mask: Tensor | None = None) -> EditResult:
        """Edit ``x`` (..., h) at strength ``alpha``; positions where ``edit_mask`` (...) is False stay untouched."""
        ...
