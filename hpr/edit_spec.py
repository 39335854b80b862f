"""What one request asks for: which adapter, which layers, how strong, over which positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hpr.errors import EditSpecError
from hpr.householder import MAX_ALPHA

Scope = Literal["all", "generated"]


@dataclass(frozen=True)
class EditSpec:
    """Edit ``layers`` with ``adapter`` at strength ``alpha`` over ``scope``. Made by ``AdapterRegistry.resolve``."""

    adapter: str
    layers: tuple[int, ...]
    alpha: float = 1.0
    scope: Scope = "all"

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or not 0.0 <= self.alpha <= MAX_ALPHA:
            raise EditSpecError(f"alpha must be a finite number in [0, {MAX_ALPHA}], got {self.alpha}", "hpr.alpha")
        if self.scope not in ("all", "generated"):
            raise EditSpecError(f"scope must be 'all' or 'generated', got {self.scope!r}", "hpr.scope")

    @property
    def is_noop(self) -> bool:
        return not self.layers or self.alpha == 0.0

    def first_edited_position(self, prompt_length: int) -> int:
        """The scope rule, in one place: positions ≥ this are edited. ``all``: every position (0); ``generated``:
        the last prompt token and every generated one (``prompt_length − 1``)."""
        return 0 if self.scope == "all" else max(prompt_length - 1, 0)
