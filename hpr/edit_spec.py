"""What one request asks for: which adapter, which layers, how strong, over which positions."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from hpr.errors import EditSpecError
from hpr.householder import MAX_ALPHA

Scope = Literal["all", "generated"]
EditTokens = int | Literal["all"]  # how many generated tokens a request edits: a count, or every one


def is_token_limit(value: object) -> bool:
    """Whether ``value`` is a valid limit on edited tokens: a whole number ≥ 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def parse_edit_tokens(text: str) -> EditTokens:
    """``"all"`` or a whole number ≥ 1 written in ASCII digits, from a command line or a configuration string;
    ValueError otherwise."""
    if text == "all":
        return "all"
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ValueError(f"expected a whole number ≥ 1 or 'all', got {text!r}")
    return int(text)


@dataclass(frozen=True)
class EditSpec:
    """Edit ``layers`` with ``adapter`` at strength ``alpha`` over ``scope``, and only while the first ``tokens``
    generated tokens are produced (None: every one). Made by ``AdapterRegistry.resolve``."""

    adapter: str
    layers: tuple[int, ...]
    alpha: float = 1.0
    scope: Scope = "all"
    tokens: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or not 0.0 <= self.alpha <= MAX_ALPHA:
            raise EditSpecError(f"alpha must be a finite number in [0, {MAX_ALPHA}], got {self.alpha}", "hpr.alpha")
        if self.scope not in ("all", "generated"):
            raise EditSpecError(f"scope must be 'all' or 'generated', got {self.scope!r}", "hpr.scope")
        if self.tokens is not None and not is_token_limit(self.tokens):
            raise EditSpecError(
                f"edit_tokens must be a whole number ≥ 1 or 'all', got {self.tokens!r}", "hpr.edit_tokens"
            )

    @property
    def is_noop(self) -> bool:
        return not self.layers or self.alpha == 0.0

    def first_edited_position(self, prompt_length: int) -> int:
        """The scope rule, in one place: positions ≥ this are edited. ``all``: every position (0); ``generated``:
        the last prompt token and every generated one (``prompt_length − 1``)."""
        return 0 if self.scope == "all" else max(prompt_length - 1, 0)

    def edited_positions_end(self, prompt_length: int) -> int | None:
        """The token limit, in one place: positions < this are edited (None: no limit). Generated token ``k``
        (1-based) is produced at position ``prompt_length − 2 + k``, so the first ``tokens`` of them come from
        positions < ``prompt_length − 1 + tokens``; the prompt's own positions are always below that."""
        return None if self.tokens is None else prompt_length - 1 + self.tokens

    def edits_decode_step(self, generated: int) -> bool:
        """Whether a decode step's input (the ``generated``-th generated token, at position ``prompt − 1 +
        generated``) is edited: :meth:`edited_positions_end` for one position, without the prompt length."""
        return self.tokens is None or generated < self.tokens


@dataclass(frozen=True)
class AdapterDefaults:
    """What a request that names an adapter but not these fields gets, set where the adapter is registered
    (``--adapter NAME=DIR:alpha=2:scope=all:tokens=all``, ``POST /v1/adapters``) instead of in its
    ``hpr_config.json``. None: the checkpoint's own default. ``tokens``: a count, or "all" (every token)."""

    alpha: float | None = None
    scope: Scope | None = None
    tokens: EditTokens | None = None

    @classmethod
    def parse(cls, fields: str, where: str) -> AdapterDefaults:
        """``alpha=A:scope=S:tokens=N`` (any of them, once each, in any order); ValueError naming ``where``."""
        values: dict[str, str] = {}
        for part in [p for p in fields.split(":") if p.strip()]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("alpha", "scope", "tokens") or key in values:
                raise ValueError(f"{where}: bad field {part!r} (alpha=, scope=, tokens=, once each)")
            values[key] = value.strip()
        try:
            alpha = float(values["alpha"]) if "alpha" in values else None
        except ValueError:
            raise ValueError(f"{where}: alpha {values['alpha']!r} is not a number") from None
        scope = values.get("scope")
        if scope is not None and scope not in ("all", "generated"):
            raise ValueError(f"{where}: scope must be 'all' or 'generated', got {scope!r}")
        try:
            tokens = parse_edit_tokens(values["tokens"]) if "tokens" in values else None
        except ValueError:
            raise ValueError(f"{where}: tokens must be a whole number ≥ 1 or 'all', got {values['tokens']!r}") from None
        return cls(alpha=alpha, scope=scope, tokens=tokens)  # type: ignore[arg-type]

    @property
    def empty(self) -> bool:
        return self.alpha is None and self.scope is None and self.tokens is None
