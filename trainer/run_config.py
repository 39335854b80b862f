"""What one ``hpr-train`` run is: its options (``RunConfig``), its data and splits, the model, its JSON files.

Shared by the training stages (:mod:`trainer.pipeline`) and the scoring-mode evaluation (:mod:`trainer.mc_eval`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hpr.edit_spec import EditTokens
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from trainer import data as D
from trainer.activations import ExtractOptions
from trainer.errors import DataError
from trainer.fit import FitOptions
from trainer.prompts import PromptFormat
from trainer.store import atomic_write


@dataclass
class RunConfig:
    """Every option of ``hpr-train``; the CLI fills it from its flags."""

    out: Path
    model: str = EMBEDDED_MODEL_ID
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    data_dir: Path | None = None
    pairs_file: Path | None = None
    splits_file: Path | None = None
    split_ratios: tuple[float, float, float] | None = None
    hub: bool = False
    format: PromptFormat = "qa"
    answers: str = "mc2"
    max_questions: int | None = None
    max_pairs_per_question: int | None = None
    seed: int = 0
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    method: str = "hpr"  # the edit method `fit` trains: "hpr" or "steer"
    fit: FitOptions = field(default_factory=FitOptions)
    max_ram_mb: int = 8192
    top_k: int | None = 3  # chosen on the eval split (docs/trainer.md); the seed's default is 5
    min_accuracy: float | None = None
    alpha: float | None = None  # select: recorded as default_alpha (None: SCORING_ALPHA); eval: the checkpoint's
    scope: str | None = None  # select: recorded as default_scope (None: "all"); eval: the checkpoint's
    edit_tokens: EditTokens | None = None  # select: recorded as default_edit_tokens (None: "all"); eval: the
    # checkpoint's
    eval_split: str = "test"
    sweep_k: tuple[int, ...] = ()
    sweep_alpha: tuple[float, ...] = ()
    pick_best: bool = False
    bootstrap: int = 10000
    eval_workers: int | None = 1  # None = auto: one per core (max 4) for 64+ questions, else 1
    skip_eval: bool = False  # run_all stops after select
    progress: bool = True

    @property
    def activations_dir(self) -> Path:
        return self.out / "activations"

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as sorted, indented JSON, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    questions: list[D.Question]  # every question of the source
    splits: dict[str, list[D.Question]]
    source: dict[str, Any]
    # The splits with TruthfulQA's own MC answers, which MC1/MC2 are defined on whatever --answers trains on.
    mc_splits: dict[str, list[D.Question]] = field(default_factory=dict)


def load_dataset(cfg: RunConfig) -> Dataset:
    """Questions and splits per the config (TruthfulQA dir / hub / JSONL; seed split file or ratios)."""
    data_dir = cfg.data_dir or D.default_data_dir()
    source: dict[str, Any] = {"format": cfg.format, "answers": cfg.answers, "seed": cfg.seed}
    if cfg.pairs_file is not None:
        questions = mc_questions = D.load_pairs_jsonl(cfg.pairs_file)
        source["pairs_file"] = str(cfg.pairs_file)
    elif data_dir is not None:
        mc_questions = D.load_truthfulqa(data_dir)
        questions = D.load_truthfulqa_csv(data_dir, mc_questions) if cfg.answers == "csv" else mc_questions
        source["data_dir"] = str(Path(data_dir).resolve())
    elif cfg.hub:
        questions = mc_questions = D.load_truthfulqa_hub()
        source["hub"] = "truthful_qa"
    else:
        raise DataError(
            "no TruthfulQA found: pass --data-dir DIR (with mc_task.json), --pairs-file FILE.jsonl, or --hub"
        )
    if cfg.answers not in ("mc2", "csv"):
        raise DataError(f"--answers must be mc2 or csv, got {cfg.answers!r}")
    if cfg.split_ratios is not None:
        ids = D.ratio_splits(len(questions), cfg.split_ratios, cfg.seed)
        source["split_ratios"] = list(cfg.split_ratios)
    else:
        splits_file = cfg.splits_file or (Path(data_dir) / D.SPLITS_FILE if data_dir and not cfg.pairs_file else None)
        if splits_file is None:
            raise DataError("no split: pass --splits-file FILE or --split-ratios TRAIN,EVAL,TEST")
        ids = D.load_splits(splits_file, len(questions))
        source["splits_file"] = str(splits_file)
    limit = cfg.max_questions
    splits = {name: D.select(questions, ids[name], limit) for name in D.SPLIT_NAMES}
    if cfg.max_pairs_per_question:
        splits["train"] = [_subsample_pairs(q, cfg.max_pairs_per_question, cfg.seed) for q in splits["train"]]
        source["max_pairs_per_question"] = cfg.max_pairs_per_question
    for name in ("train", "eval"):
        if not splits[name]:
            raise DataError(f"the {name} split is empty")
    source["max_questions"] = limit
    mc_splits = {name: D.select(mc_questions, ids[name], limit) for name in D.SPLIT_NAMES}
    return Dataset(questions, splits, source, mc_splits)


def _subsample_pairs(question: D.Question, k: int, seed: int) -> D.Question:
    pairs = question.answer_pairs()
    if len(pairs) <= k:
        return question
    chosen = sorted(random.Random(f"{seed}:pairs:{question.index}").sample(pairs, k))
    return replace(question, pairs=tuple(chosen))


# --- model --------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """``None`` = all cores but one (min 1): on a shared CPU, torch threads spinning against other processes
    slow every matmul several-fold."""
    n = threads if threads else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def get_model(cfg: RunConfig, cache: dict[str, LoadedModel]) -> LoadedModel:
    """The run's model, loaded once per ``cache``."""
    if "model" not in cache:
        set_threads(cfg.threads)
        cache["model"] = load_model(cfg.model, cfg.device, cfg.dtype)
    return cache["model"]
