"""Loading TruthfulQA, generic pair files and splits; every bad input names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import (
    Question,
    load_pairs_jsonl,
    load_splits,
    load_truthfulqa,
    load_truthfulqa_csv,
    ratio_splits,
    select,
)
from trainer.errors import DataError


def test_truthfulqa_loads_817_questions_with_mc1_and_mc2(truthfulqa_dir: Path) -> None:
    questions = load_truthfulqa(truthfulqa_dir)
    assert len(questions) == 817
    q = questions[0]
    assert q.index == 0 and q.correct and q.incorrect
    assert q.mc1_correct in q.correct and set(q.mc1_incorrect) <= set(q.incorrect)


def test_seed_split_has_367_41_409_questions(truthfulqa_dir: Path) -> None:
    splits = load_splits(truthfulqa_dir / "ids_splits.json", 817)
    assert [len(splits[n]) for n in ("train", "eval", "test")] == [367, 41, 409]


def test_pairs_are_every_correct_times_every_incorrect() -> None:
    q = Question(0, "q?", ("a", "b"), ("x", "y", "z"))
    assert q.answer_pairs() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_csv_answers_are_matched_to_mc_rows_by_question(truthfulqa_dir: Path) -> None:
    mc = load_truthfulqa(truthfulqa_dir)[:20]
    gen = load_truthfulqa_csv(truthfulqa_dir, mc)
    assert [q.index for q in gen] == [q.index for q in mc]
    assert any(g.correct != m.correct for g, m in zip(gen, mc, strict=True))
    assert all(g.mc1_correct == m.mc1_correct for g, m in zip(gen, mc, strict=True))


def test_jsonl_pairs_group_by_question_and_keep_only_listed_pairs(tmp_path: Path) -> None:
    file = tmp_path / "pairs.jsonl"
    lines = [
        {"question": "q1", "positive": "p1", "negative": "n1"},
        {"question": "q1", "positive": "p2", "negative": "n1"},
        {"question": "q2", "positive": "p", "negative": "n"},
    ]
    file.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    qs = load_pairs_jsonl(file)
    assert [q.question for q in qs] == ["q1", "q2"]
    assert qs[0].correct == ("p1", "p2") and qs[0].incorrect == ("n1",)
    assert qs[0].answer_pairs() == [(0, 0), (1, 0)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON list"),
        ('[{"question": "q"}]', "mc2_targets"),
        ('[{"question": "", "mc2_targets": {"a": 1, "b": 0}}]', "'question'"),
        ('[{"question": "q", "mc2_targets": {"a": 1}}]', "at least one correct and one incorrect"),
        ('[{"question": "q", "mc2_targets": {"a": 1, "b": "no"}}]', "must be 0 or 1"),
    ],
)
def test_bad_mc_task_file_names_file_and_field(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "mc_task.json").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_truthfulqa(tmp_path)
    assert "mc_task.json" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("not json\n", ":1: not valid JSON"),
        ('{"question": "q", "positive": "p"}\n', "key 'negative'"),
        ('["q", "p", "n"]\n', "expected an object"),
    ],
)
def test_bad_jsonl_names_line_and_key(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "pairs.jsonl"
    file.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_pairs_jsonl(file)
    assert "pairs.jsonl" in str(info.value)


def test_csv_with_wrong_columns_is_refused(tmp_path: Path, truthfulqa_dir: Path) -> None:
    (tmp_path / "TruthfulQA.csv").write_text("Q,A\nx,y\n")
    with pytest.raises(DataError, match=r"TruthfulQA.csv: missing column\(s\)"):
        load_truthfulqa_csv(tmp_path, load_truthfulqa(truthfulqa_dir)[:2])


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": [0], "eval": [1]}, "key 'test'"),
        ({"train": [0], "eval": [1], "test": [99]}, "out of range"),
        ({"train": [0, 1], "eval": [1], "test": [2]}, "more than one split"),
        ({"train": ["0"], "eval": [1], "test": [2]}, "list of integers"),
    ],
)
def test_bad_split_file_is_refused(tmp_path: Path, splits: dict[str, list[int]], message: str) -> None:
    file = tmp_path / "ids_splits.json"
    file.write_text(json.dumps(splits))
    with pytest.raises(DataError, match=message):
        load_splits(file, 10)


def test_ratio_splits_are_seeded_disjoint_and_complete() -> None:
    a = ratio_splits(100, (0.45, 0.05, 0.5), seed=3)
    assert a == ratio_splits(100, (0.45, 0.05, 0.5), seed=3)
    assert a != ratio_splits(100, (0.45, 0.05, 0.5), seed=4)
    assert [len(a[n]) for n in ("train", "eval", "test")] == [45, 5, 50]
    assert sorted(a["train"] + a["eval"] + a["test"]) == list(range(100))
    with pytest.raises(DataError):
        ratio_splits(10, (1.0, 0.0), seed=0)


def test_select_keeps_split_order_and_limit(small_questions: list[Question]) -> None:
    assert [q.index for q in select(small_questions, [2, 0, 1], limit=2)] == [2, 0]


def test_data_dir_comes_from_the_environment_or_next_to_the_checkout(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from trainer.data import default_data_dir

    (tmp_path / "mc_task.json").write_text("[]")
    monkeypatch.setenv("HPR_TRUTHFULQA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("HPR_TRUTHFULQA_DIR", str(tmp_path / "absent"))
    found = default_data_dir()
    assert found is None or (found / "mc_task.json").is_file()
