"""Constrained decoding in the hf engine: each row with an output constraint gets its own grammar matcher.

Before a step's tokens are chosen, every constrained row's logits keep only the tokens its grammar allows next (a
bitmask from llguidance, as vLLM's guidance backend makes it); the other rows are untouched, so rows with different
grammars, or none, share one batch. After the step, each matcher takes its row's token; a row whose grammar has
ended (it took the end-of-sequence token after a complete JSON value, the only token then allowed) finishes with
``stop``.

The grammars are made by the serving layer before a request reaches the engine (:mod:`server.serving.structured`);
here a row copies the grammar's start matcher (microseconds), and filling its mask takes about 0.1 ms a step
(``bench/grammar_fill.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from server.engine.types import OutputConstraint


class GrammarRejectedError(RuntimeError):
    """A token the row's grammar did not allow was chosen (a bug: the mask should have prevented it)."""


@dataclass
class RowGrammar:
    """One request's place in its grammar: llguidance's matcher, and whether the grammar has ended."""

    matcher: Any
    ended: bool = False

    def accept(self, token: int) -> bool:
        """Take the row's chosen token; False when the grammar does not allow it."""
        if self.ended:
            return False
        complete = self.matcher.is_stopped()  # a complete value: only the end-of-sequence token is allowed now
        if not self.matcher.consume_token(token):
            return False
        # ended: the token after a complete value (the end of sequence), or the end of sequence after a value that
        # could have gone on (a number)
        self.ended = complete or str(self.matcher.stop_reason()) == "EndOfSentence"
        return True


def preload() -> None:
    """Import the mask libraries ahead of the first constrained step (llguidance's torch helpers import
    ``torch._dynamo``, xgrammar its runtime: about 1.5 s the first time)."""
    import llguidance.torch  # noqa: F401
    import xgrammar  # noqa: F401


def new_matcher(constraint: OutputConstraint | None) -> RowGrammar | None:
    """A fresh matcher for one request's constraint (None: no constraint, or one without a grammar)."""
    if constraint is None or constraint.grammar is None:
        return None
    return RowGrammar(constraint.grammar.deep_copy())


def mask_logits(logits: Tensor, matchers: Sequence[RowGrammar | None]) -> None:
    """Keep, in each constrained row of ``logits`` (B, V) float32, only the tokens its grammar allows (in place)."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    import llguidance.torch
    import xgrammar as xgr

    bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), logits.shape[-1])  # (B, ⌈V/32⌉) int32, CPU
    for row in rows:
        llguidance.torch.fill_next_token_bitmask(matchers[row].matcher, bitmask, row)  # type: ignore[union-attr]
    # the same bit layout in both libraries; xgrammar's kernel applies it in place, as vLLM does for both backends
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def accept_tokens(matchers: Sequence[RowGrammar | None], tokens: Sequence[int]) -> dict[int, BaseException]:
    """Advance each constrained row's matcher by its chosen token; the rows whose token it refused."""
    failed: dict[int, BaseException] = {}
    for row, matcher in enumerate(matchers):
        if matcher is not None and tokens[row] >= 0 and not matcher.accept(tokens[row]):
            failed[row] = GrammarRejectedError(f"token {tokens[row]} is not allowed by the request's grammar")
    return failed


def grammar_ended(matcher: RowGrammar | None) -> bool:
    """Whether the row's grammar is complete and has taken its end token: the row is done."""
    return matcher is not None and matcher.ended
