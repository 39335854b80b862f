"""The fluency guard and the rule that chooses a served default, on hand-made summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.cli import main
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


# --- judging a finished run again (hpr-train eval-gen --rescore) -----------------------------------------------------


def _entry(text: str, ppl: float | None, **stored: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "text": text,
        "perplexity": ppl,
        "finish_reason": "stop",
        "completion_tokens": 9,
        "rep4": 0.0,
        "non_answer": False,
        "degenerate": False,
        **dict.fromkeys(("bleu_acc", "rougeL_acc", "bleu_diff", "rougeL_diff", "bleu_max", "rougeL_max"), 0.0),
    }
    entry.update(stored)
    return entry


def _stored_run(out: Path) -> None:
    """Two TruthfulQA questions and one everyday one, judged by older rules: every answer stored as an answer, not
    degenerate."""
    rows = [
        {"set": "truthfulqa", "index": 0, "question": "q0", "answers": {
            "base": _entry("Paris is the capital.", 2.0),
            "edit": _entry("The AI does not have the ability to access personal data.", 2.5),
        }},
        {"set": "truthfulqa", "index": 1, "question": "q1", "answers": {
            "base": _entry("Blue, because of scattering.", 3.0),
            "edit": _entry("Blue light scatters more.", 4.0),  # above the base's 95th percentile (2.95)
        }},
        {"set": "general", "question": "g0", "answers": {
            "base": _entry("Boil it for nine minutes.", 2.0),
            "edit": _entry("", None),  # empty: a non-answer, not degenerate
        }},
    ]  # fmt: skip
    report = {
        "split": "eval",
        "questions": 2,
        "chat_questions": 1,
        "configs": {"base": {}, "edit": {}},
        "seconds": {"total": 1},
    }
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "eval_gen.json").write_text(json.dumps(report))


def test_rescore_judges_stored_answers_by_todays_rules(tmp_path: Path) -> None:
    _stored_run(tmp_path)
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore", "--bootstrap", "200"]) == 0
    report = json.loads((tmp_path / "eval_gen.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    edit = [r["answers"]["edit"] for r in rows]
    assert [e["non_answer"] for e in edit] == [True, False, True]
    assert [e["degenerate"] for e in edit] == [False, True, False]
    assert [r["answers"]["base"]["non_answer"] for r in rows] == [False, False, False]
    # The limit is the base's own 95th percentile on the set (2 + 0.95 × (3 - 2)), so the base's 3.0 is over it too.
    assert [r["answers"]["base"]["degenerate"] for r in rows] == [False, True, False]
    assert report["rescored"] == {"changed_answers": 4} and report["bootstrap"] == {"samples": 200, "seed": 0}
    tqa = report["results"]["edit"]["truthfulqa"]["fluency"]
    assert tqa["non_answer"]["value"] == pytest.approx(0.5) and tqa["non_answer"]["delta"] == pytest.approx(0.5)
    assert tqa["degenerate"]["value"] == pytest.approx(0.5) and tqa["degenerate"]["delta"] == pytest.approx(0.0)
    assert tqa["median_perplexity"] == pytest.approx(3.25) and tqa["perplexity_ratio"] == pytest.approx(3.25 / 2.5)
    assert report["results"]["edit"]["general"]["fluency"]["non_answer"]["value"] == pytest.approx(1.0)
    assert report["results"]["edit"]["guard"]["holds"] is False
    assert report["rule"] == {"choice": None, "least_harm": "edit", "reason": "no edit holds the fluency guard"}
    assert report["seconds"] == {"total": 1}  # the rest of the summary is kept
    assert rows[2]["answers"]["edit"]["perplexity"] is None  # strict JSON again
    # Judged again, nothing changes; the run's own bootstrap settings are kept unless given.
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore", "--seed", "3"]) == 0
    again = json.loads((tmp_path / "eval_gen.json").read_text())
    assert again["rescored"] == {"changed_answers": 0} and again["bootstrap"] == {"samples": 200, "seed": 3}


def test_rescore_bad_runs_are_named_and_left_as_they_were(tmp_path: Path, capsys: Any) -> None:
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert f"{tmp_path / 'eval_gen.json'}: not found" in capsys.readouterr().err
    _stored_run(tmp_path)
    rows = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join([*rows[:2], rows[2].replace('"edit"', '"other"')]) + "\n")
    before = {f: (tmp_path / f).read_text() for f in ("eval_gen.json", "answers.jsonl")}
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert "does not hold every configuration" in capsys.readouterr().err
    assert {f: (tmp_path / f).read_text() for f in before} == before
    _stored_run(tmp_path)
    rows = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join([*rows[:2], rows[2].replace('"text"', '"words"')]) + "\n")
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert "an answer lacks what eval-gen stores with it (KeyError('text'))" in capsys.readouterr().err
    _stored_run(tmp_path)
    (tmp_path / "answers.jsonl").write_text('{"set": "truthfulqa", "answers": null}\n')
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert "missing: ['base', 'edit']" in capsys.readouterr().err
    (tmp_path / "answers.jsonl").write_text("\n")
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert "answers.jsonl: no answers" in capsys.readouterr().err
    _stored_run(tmp_path)
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore", "--config", "x=tiny"]) == 2
    assert "--rescore judges stored answers; it takes no --config" in capsys.readouterr().err
    (tmp_path / "eval_gen.json").write_text("{not json")
    assert main(["eval-gen", "--out", str(tmp_path), "--rescore"]) == 2
    assert "not an eval-gen run" in capsys.readouterr().err
