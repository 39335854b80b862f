"""experiments/rerank_offline.py: the candidate pool and the judged picks, against hand-computed values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import rerank_offline as ro


def _answer(text: str, bleu: float, rouge: float, ppl: float = 2.0, degenerate: bool = False) -> dict[str, object]:
    return {"text": text, "bleu_acc": bleu, "rougeL_acc": rouge, "perplexity": ppl, "degenerate": degenerate}


def test_candidates_are_distinct_texts_base_first_truthfulqa_only(tmp_path: Path) -> None:
    rows = [
        {"index": 3, "question": "Q?", "set": "truthfulqa", "answers": {
            "zz": _answer("B", 1, 1), "base": _answer("A", 0, 0), "aa": _answer("D", 0, 0), "mm": _answer("C", 0, 1),
            "nn": _answer("A", 1, 1)}},
        {"index": 0, "question": "hi", "set": "everyday", "answers": {"base": _answer("x", 0, 0)}},
    ]  # fmt: skip
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = ro.candidates(tmp_path, "s1")
    assert [q["index"] for q in got] == [3]
    assert [a["text"] for a in got[0]["answers"]] == ["A", "D", "C", "B"]  # base, then the others by name, "A" once
    assert got[0]["answers"][0]["bleu_acc"] == 0  # the base's own judgement kept for its text


def test_report_judges_the_pick_against_the_base_answer() -> None:
    questions = [
        {"answers": [_answer("a", 0, 0, ppl=2.0), _answer("b", 1, 1, ppl=4.0, degenerate=True)]},
        {"answers": [_answer("c", 1, 0, ppl=3.0), _answer("d", 0, 0, ppl=5.0)]},
    ]
    row = ro.report("x", questions, [1, 0], samples=200)
    assert row["bleu_acc"]["base"] == pytest.approx(50.0)
    assert row["bleu_acc"]["delta"] == pytest.approx(50.0)  # (1 + 1)/2 − (0 + 1)/2
    assert row["rougeL_acc"]["delta"] == pytest.approx(50.0)  # (1 + 0)/2 − 0
    assert row["truth"]["delta"] == pytest.approx(50.0)
    assert row["ppl_ratio"] == pytest.approx(3.5 / 2.5)  # median(4, 3) ÷ median(2, 3)
    assert row["degenerate"] == pytest.approx(50.0)
    assert row["changed"] == pytest.approx(50.0)


def test_pick_is_the_first_highest_score() -> None:
    assert ro.pick([-3.0, -1.0, -1.0, -2.0]) == 1
