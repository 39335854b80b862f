"""Training data: TruthfulQA (local copy, or the Hugging Face hub for users online) and generic pair files.

Everything becomes a list of :class:`Question`: a question with its correct and incorrect answers, plus which
(correct, incorrect) pairs to train on (every correct × every incorrect unless a pair file says otherwise).
``Question.index`` is the row in the source file, which is what the seed's ``ids_splits.json`` refers to.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import DataError

MC_FILE = "mc_task.json"
CSV_FILE = "TruthfulQA.csv"
SPLITS_FILE = "ids_splits.json"
SPLIT_NAMES = ("train", "eval", "test")
CSV_COLUMNS = ("Question", "Correct Answers", "Incorrect Answers")


@dataclass(frozen=True)
class Question:
    """One question and its answers. ``pairs`` index ``(correct, incorrect)``; empty = every combination."""

    index: int
    question: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...] = ()
    mc1_correct: str | None = None  # the single MC1 answer (TruthfulQA only)
    mc1_incorrect: tuple[str, ...] = field(default=())

    def answer_pairs(self) -> list[tuple[int, int]]:
        """(correct index, incorrect index) pairs to train on."""
        if self.pairs:
            return list(self.pairs)
        return [(i, j) for i in range(len(self.correct)) for j in range(len(self.incorrect))]


def default_data_dir() -> Path | None:
    """``$HPR_TRUTHFULQA_DIR``, else ``../shared/data/truthfulqa`` relative to the cwd or to this checkout."""
    env = os.environ.get("HPR_TRUTHFULQA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data" / "truthfulqa")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa")
    for path in candidates:
        if (path / MC_FILE).is_file():
            return path
    return None


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{file}: not valid JSON: {exc}") from exc


def _targets(file: Path, row: int, obj: dict[str, Any], key: str) -> dict[str, int]:
    targets = obj.get(key)
    if not isinstance(targets, dict) or not targets:
        raise DataError(f"{file}: row {row}: field {key!r} must be a non-empty object {{answer: 0/1}}")
    out: dict[str, int] = {}
    for answer, label in targets.items():
        if label not in (0, 1) or isinstance(label, bool):
            raise DataError(f"{file}: row {row}: {key}[{answer!r}] must be 0 or 1, got {label!r}")
        out[str(answer)] = int(label)
    return out


def questions_from_mc_records(records: Any, file: Path) -> list[Question]:
    """Parse ``mc_task.json``-shaped records (a list of {question, mc1_targets, mc2_targets})."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{file}: expected a non-empty JSON list of questions")
    out: list[Question] = []
    for row, obj in enumerate(records):
        if not isinstance(obj, dict):
            raise DataError(f"{file}: row {row}: expected an object, got {type(obj).__name__}")
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{file}: row {row}: field 'question' must be a non-empty string")
        mc2 = _targets(file, row, obj, "mc2_targets")
        mc1 = _targets(file, row, obj, "mc1_targets") if "mc1_targets" in obj else {}
        correct = tuple(a for a, y in mc2.items() if y == 1)
        incorrect = tuple(a for a, y in mc2.items() if y == 0)
        if not correct or not incorrect:
            raise DataError(f"{file}: row {row}: mc2_targets needs at least one correct and one incorrect answer")
        mc1_correct = [a for a, y in mc1.items() if y == 1]
        if mc1 and len(mc1_correct) != 1:
            raise DataError(f"{file}: row {row}: mc1_targets must have exactly one correct answer")
        out.append(
            Question(
                index=row,
                question=question,
                correct=correct,
                incorrect=incorrect,
                mc1_correct=mc1_correct[0] if mc1_correct else None,
                mc1_incorrect=tuple(a for a, y in mc1.items() if y == 0),
            )
        )
    return out


def load_truthfulqa(data_dir: str | os.PathLike[str]) -> list[Question]:
    """The 817 TruthfulQA questions from ``<data_dir>/mc_task.json`` (mc2 answers; mc1 kept for evaluation)."""
    file = Path(data_dir) / MC_FILE
    return questions_from_mc_records(_read_json(file), file)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _csv_answers(data_dir: str | os.PathLike[str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``TruthfulQA.csv``'s generation answers (``; ``-separated) by normalised question text."""
    file = Path(data_dir) / CSV_FILE
    if not file.is_file():
        raise DataError(f"{file}: file not found")
    try:
        with file.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{file}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: cannot read CSV: {exc}") from exc
    if not rows:
        raise DataError(f"{file}: no rows")
    out: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for r in rows:
        correct = tuple(a.strip() for a in (r["Correct Answers"] or "").split(";") if a.strip())
        incorrect = tuple(a.strip() for a in (r["Incorrect Answers"] or "").split(";") if a.strip())
        out[_norm(r["Question"] or "")] = (correct, incorrect)
    return out


def load_truthfulqa_csv(data_dir: str | os.PathLike[str], mc_questions: Sequence[Question]) -> list[Question]:
    """The generation-task answers of ``TruthfulQA.csv`` (``; ``-separated), indexed like ``mc_task.json``.

    Rows are matched to ``mc_questions`` by question text (the two files are in different orders); questions
    without a CSV row keep their mc2 answers. MC1 targets are kept from ``mc_questions``.
    """
    by_question = _csv_answers(data_dir)
    out: list[Question] = []
    for q in mc_questions:
        correct, incorrect = by_question.get(_norm(q.question), ((), ()))
        if not correct or not incorrect:
            out.append(q)
            continue
        out.append(Question(q.index, q.question, correct, incorrect, (), q.mc1_correct, q.mc1_incorrect))
    return out


def generation_references(
    data_dir: str | os.PathLike[str], questions: Sequence[Question]
) -> dict[int, tuple[tuple[str, ...], tuple[str, ...]]]:
    """(correct, incorrect) generation references of every question, from ``TruthfulQA.csv``, by question index.

    Raises :class:`DataError` naming the questions that have no row with both kinds of answer."""
    by_question = _csv_answers(data_dir)
    out = {q.index: by_question.get(_norm(q.question), ((), ())) for q in questions}
    missing = [i for i, (c, w) in out.items() if not c or not w]
    if missing:
        raise DataError(
            f"{Path(data_dir) / CSV_FILE}: no generation references (correct and incorrect answers) for "
            f"{len(missing)} question(s), indices {missing[:10]}"
        )
    return out


def load_pairs_jsonl(file: str | os.PathLike[str]) -> list[Question]:
    """A generic JSONL of ``{"question", "positive", "negative"}`` lines, grouped by question (first-seen order).

    Only the listed (positive, negative) pairs are trained on; ``Question.index`` is the group's order.
    """
    path = Path(file)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    groups: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected an object with keys question, positive, negative")
        for key in ("question", "positive", "negative"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{path}:{lineno}: key {key!r} must be a non-empty string")
        group = groups.setdefault(obj["question"], {"pos": [], "neg": [], "pairs": []})
        for side, key in (("pos", "positive"), ("neg", "negative")):
            if obj[key] not in group[side]:
                group[side].append(obj[key])
        group["pairs"].append((group["pos"].index(obj["positive"]), group["neg"].index(obj["negative"])))
    if not groups:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return [
        Question(i, q, tuple(g["pos"]), tuple(g["neg"]), tuple(dict.fromkeys(g["pairs"])))
        for i, (q, g) in enumerate(groups.items())
    ]


def load_truthfulqa_hub() -> list[Question]:  # pragma: no cover - needs the network
    """TruthfulQA from the Hugging Face hub (``truthful_qa``, ``multiple_choice``), for users online."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataError("loading TruthfulQA from the hub needs the `datasets` package: pip install datasets") from exc
    ds = load_dataset("truthful_qa", "multiple_choice", split="validation")
    records = [
        {
            "question": r["question"],
            "mc1_targets": dict(zip(r["mc1_targets"]["choices"], r["mc1_targets"]["labels"], strict=True)),
            "mc2_targets": dict(zip(r["mc2_targets"]["choices"], r["mc2_targets"]["labels"], strict=True)),
        }
        for r in ds
    ]
    return questions_from_mc_records(records, Path("hub:truthful_qa"))


def load_splits(file: str | os.PathLike[str], num_questions: int) -> dict[str, list[int]]:
    """The seed's ``ids_splits.json``: ``{"train": [...], "eval": [...], "test": [...]}`` of row indices."""
    path = Path(file)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with keys {list(SPLIT_NAMES)}")
    out: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name in SPLIT_NAMES:
        ids = data.get(name)
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{path}: key {name!r} must be a list of integers")
        bad = [i for i in ids if not 0 <= i < num_questions]
        if bad:
            raise DataError(f"{path}: {name} ids {bad[:5]} out of range for {num_questions} questions")
        overlap = seen.intersection(ids)
        if overlap:
            raise DataError(f"{path}: ids {sorted(overlap)[:5]} appear in more than one split")
        seen.update(ids)
        out[name] = list(ids)
    return out


def ratio_splits(num_questions: int, ratios: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Shuffle ``range(num_questions)`` with ``seed`` and cut it by ``ratios`` (train, eval, test; normalised)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"split ratios must be three non-negative numbers (train, eval, test), got {list(ratios)}")
    ids = list(range(num_questions))
    random.Random(seed).shuffle(ids)
    total = sum(ratios)
    n_train = round(num_questions * ratios[0] / total)
    n_eval = round(num_questions * ratios[1] / total)
    return {"train": ids[:n_train], "eval": ids[n_train : n_train + n_eval], "test": ids[n_train + n_eval :]}


def select(questions: Sequence[Question], ids: Sequence[int], limit: int | None = None) -> list[Question]:
    """The questions whose ``index`` is in ``ids`` (in ``ids`` order), the first ``limit`` of them."""
    by_index = {q.index: q for q in questions}
    out = [by_index[i] for i in ids if i in by_index]
    return out[:limit] if limit is not None else out
