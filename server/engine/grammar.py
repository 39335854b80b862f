"""Constrained decoding in the hf engine: each row with an output constraint gets its own grammar matcher.

Before a step's tokens are chosen, every constrained row's logits keep only the tokens its grammar allows next (a
bitmask from xgrammar, the library vLLM uses); the other rows are untouched, so rows with different grammars, or
none, share one batch. After the step, each matcher accepts its row's token; a row whose grammar has ended (it
accepted the end-of-sequence token after a complete JSON value) finishes with ``stop``.

The grammars are compiled by the serving layer before a request reaches the engine
(:mod:`server.serving.structured`); here a matcher per row is all that is made (cheap), and the bitmask filled per
step takes microseconds per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from server.engine.types import OutputConstraint


class GrammarRejectedError(RuntimeError):
    """A token the row's grammar did not allow was chosen (a bug: the mask should have prevented it)."""


def new_matcher(constraint: OutputConstraint | None) -> Any:
    """A fresh matcher for one request's constraint (None: no constraint, or one without a compiled grammar)."""
    if constraint is None or constraint.grammar is None:
        return None
    import xgrammar as xgr

    return xgr.GrammarMatcher(constraint.grammar)


def mask_logits(logits: Tensor, matchers: Sequence[Any]) -> None:
    """Keep, in each constrained row of ``logits`` (B, V) float32, only the tokens its grammar allows (in place)."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])  # (B, ⌈V/32⌉) int32, on the CPU
    for row in rows:
        matchers[row].fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def accept_tokens(matchers: Sequence[Any], tokens: Sequence[int]) -> dict[int, BaseException]:
    """Advance each constrained row's matcher by its chosen token; the rows whose token it refused."""
    failed: dict[int, BaseException] = {}
    for row, matcher in enumerate(matchers):
        if matcher is not None and tokens[row] >= 0 and not matcher.accept_token(tokens[row]):
            failed[row] = GrammarRejectedError(f"token {tokens[row]} is not allowed by the request's grammar")
    return failed


def grammar_ended(matcher: Any) -> bool:
    """Whether the row's grammar is complete and has taken its end token: the row is done."""
    return matcher is not None and bool(matcher.is_terminated())
