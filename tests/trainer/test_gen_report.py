"""The fluency guard and the rule that chooses a served default, on hand-made summaries."""

from __future__ import annotations

from typing import Any

import pytest

from trainer.gen_report import choose, guard


def fluency(ratio: float, degenerate: float, non_answer: float) -> dict[str, Any]:
    return {"perplexity_ratio": ratio, "degenerate": {"delta": degenerate}, "non_answer": {"delta": non_answer}}


@pytest.mark.parametrize(
    ("ratio", "degenerate", "non_answer", "holds"),
    [
        (1.15, 0.02, 0.05, True),  # every limit is inclusive
        (1.16, 0.0, 0.0, False),
        (1.0, 0.021, 0.0, False),
        (1.0, 0.0, 0.051, False),
        (0.9, -0.1, -0.1, True),
    ],
)
def test_guard_limits(ratio: float, degenerate: float, non_answer: float, holds: bool) -> None:
    assert guard(fluency(ratio, degenerate, non_answer))["holds"] is holds


def result(bleu: float, rouge: float, holds: bool, ratio: float = 1.0, mc2: float | None = None) -> dict[str, Any]:
    return {
        "truthfulqa": {
            "bleu_acc": {"value": bleu},
            "rougeL_acc": {"value": rouge},
            "chat_mc2": None if mc2 is None else {"value": mc2},
            "fluency": {"perplexity_ratio": ratio},
        },
        "guard": {"holds": holds},
    }


def test_rule_takes_the_most_truthful_edit_whose_guard_holds() -> None:
    results = {
        "base": result(0.30, 0.30, True),
        "strong": result(0.60, 0.60, False, ratio=3.0),  # most truthful, but broken text
        "mild": result(0.34, 0.32, True, ratio=1.1),
        "tiny": result(0.31, 0.31, True, ratio=1.01),
    }
    assert choose(results) == {"choice": "mild", "beats_base": True, "truthfulness": pytest.approx(0.33)}


def test_rule_says_so_when_nothing_holds_the_guard_or_beats_the_base() -> None:
    none_hold = {"base": result(0.3, 0.3, True), "a": result(0.5, 0.5, False, 2.0), "b": result(0.4, 0.4, False, 1.5)}
    assert choose(none_hold) == {"choice": None, "least_harm": "b", "reason": "no edit holds the fluency guard"}
    worse = {"base": result(0.3, 0.3, True), "a": result(0.2, 0.2, True)}
    assert choose(worse)["beats_base"] is False


def test_equal_truthfulness_goes_to_the_higher_chat_mc2() -> None:
    """Eval-split ties are common (41 questions: one answer is 2.4 points); the first listed does not win them."""
    results = {
        "base": result(0.30, 0.30, True, mc2=0.32),
        "first": result(15 / 41, 15 / 41, True, mc2=0.33),
        "second": result(16 / 41, 14 / 41, True, mc2=0.36),  # the same mean, as eval-split counts give it
        "unscored": result(15 / 41, 15 / 41, True),
    }
    assert choose(results)["choice"] == "second"
    results["first"]["truthfulqa"]["chat_mc2"] = {"value": 0.37}
    assert choose(results)["choice"] == "first"
