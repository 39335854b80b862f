"""The stages of ``hpr-train`` over one output directory; each skips itself when its output is already there.

``OUT/data.json``            the questions of each split (indices), the prompt format, pair counts
``OUT/activations/{train,eval}``  activation stores (see trainer/store.py)
``OUT/checkpoint/``          the adapter (hpr_config.json + hpr_model.safetensors) + probe_accuracy.png; its method is
                           ``--method``: ``hpr`` (default) or ``steer`` (a steering vector, trainer/steer.py)
``OUT/fit.json``             per-epoch training loss and eval probe accuracy per layer (steer: accuracy only)
``OUT/eval.json``            MC1/MC2 base vs edited on the test split, CIs, per-question scores, sweeps
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hpr.checkpoint import CONFIG_NAME, WEIGHTS_NAME, HPRAdapter, HPRConfig
from hpr.edit_spec import EditTokens
from hpr.editing import Scope
from hpr.householder import default_widths
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from trainer import data as D
from trainer.activations import ExtractOptions, Extractor, store_settings
from trainer.errors import DataError, TrainerError
from trainer.evaluate import MCScore, ScoringJob, score_edited, score_in_workers, score_questions, summarize
from trainer.fit import FitOptions, fit
from trainer.pairs import PairSet
from trainer.prompts import PromptFormat, encode_all
from trainer.select import plot_probe_accuracy, select_layers
from trainer.steer import fit_steering
from trainer.store import ActivationStore, atomic_write

log = logging.getLogger(__name__)

SCORING_ALPHA = 2.0  # the scoring-mode MC optimum on the eval split (docs/trainer.md)
# What `select` records as default_alpha when --alpha is not given, per method ("steer": the plain mean difference).
DEFAULT_ALPHA = {"hpr": SCORING_ALPHA, "steer": 1.0}
METHODS = tuple(DEFAULT_ALPHA)


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


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_json(path: Path) -> Any:
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


def stage_data(cfg: RunConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    ds = load_dataset(cfg)
    summary: dict[str, Any] = {"source": ds.source, "splits": {}}
    for name, qs in ds.splits.items():
        entry: dict[str, Any] = {"questions": len(qs), "indices": [q.index for q in qs]}
        entry["pairs"] = sum(len(q.answer_pairs()) for q in qs)
        if tokenizer is not None and name != "test":
            enc = encode_all(tokenizer, qs, cfg.format, cfg.seed)
            entry["prompt_tokens"] = sum(len(e.prompt_ids) for e in enc)
            entry["answer_tokens"] = sum(len(a) for e in enc for a in e.answers)
        summary["splits"][name] = entry
    _write_json(cfg.out / "data.json", summary)
    return summary


# --- model --------------------------------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """``None`` = all cores but one (min 1): on a shared CPU, torch threads spinning against other processes
    slow every matmul several-fold."""
    n = threads if threads else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    return n


def get_model(cfg: RunConfig, cache: dict[str, LoadedModel]) -> LoadedModel:
    if "model" not in cache:
        set_threads(cfg.threads)
        cache["model"] = load_model(cfg.model, cfg.device, cfg.dtype)
    return cache["model"]


# --- extract ------------------------------------------------------------------------------------------------------


def stage_extract(cfg: RunConfig, cache: dict[str, LoadedModel]) -> dict[str, Any]:
    ds = load_dataset(cfg)
    summaries: dict[str, Any] = {}
    for name in ("train", "eval"):
        store = ActivationStore(cfg.activations_dir / name)
        settings = store_settings(cfg.model, cfg.extract, _data_fingerprint(ds, name))
        if store.complete and store.manifest.get("settings") == settings:
            log.info("activations/%s: complete, reused", name)
            summaries[name] = store.manifest.get("summary", {})
            continue
        lm = get_model(cfg, cache)
        encoded = encode_all(lm.tokenizer, ds.splits[name], cfg.format, cfg.seed)
        summaries[name] = Extractor(lm.model, cfg.extract).run(
            encoded, store, settings, desc=f"extract {name}", progress=cfg.progress
        )
    return summaries


def _data_fingerprint(ds: Dataset, split: str) -> dict[str, Any]:
    qs = ds.splits[split]
    return {
        "source": ds.source,
        "split": split,
        "indices": [q.index for q in qs],
        "pairs": sum(len(q.answer_pairs()) for q in qs),
    }


# --- fit + select -------------------------------------------------------------------------------------------------


def stage_fit(cfg: RunConfig) -> dict[str, Any]:
    """Train every layer; write the checkpoint (all layers, selection per top-k/threshold) and fit.json."""
    if cfg.method not in METHODS:
        raise TrainerError(f"--method must be one of {list(METHODS)}, got {cfg.method!r}")
    stores = {n: ActivationStore(cfg.activations_dir / n) for n in ("train", "eval")}
    settings: dict[str, Any] = {"fit": asdict(cfg.fit), "train_store": stores["train"].manifest.get("settings")}
    if cfg.method != "hpr":  # HPR runs keep the settings (and so the checkpoints) they had before methods existed
        settings = {"method": cfg.method, "train_store": settings["train_store"]}
    previous = _read_json(cfg.out / "fit.json")
    if previous and previous.get("settings") == settings and (cfg.checkpoint_dir / CONFIG_NAME).is_file():
        log.info("fit: checkpoint exists with the same settings, reused")
        return dict(previous)
    train = PairSet.from_store(stores["train"], cfg.max_ram_mb)
    evaluation = PairSet.from_store(stores["eval"], cfg.max_ram_mb)
    if cfg.method == "steer":
        return _fit_steering(cfg, settings, train, evaluation, stores["train"].manifest["settings"])
    result = fit(train, evaluation, cfg.fit, progress=cfg.progress)
    store_settings_ = stores["train"].manifest["settings"]
    num_layers, hidden = train.num_layers, train.hidden_size
    config = HPRConfig(
        base_model=store_settings_["model"],
        hidden_size=hidden,
        num_layers=num_layers,
        layers=list(range(num_layers)),
        selected_layers=[],
        probe_accuracy=result.eval_accuracy,
        angle_widths=default_widths(hidden, cfg.fit.angle_layers),
        training={
            "fit": asdict(cfg.fit),
            "data": store_settings_["data"]["source"],
            "extract": store_settings_["options"],
            "best_epoch": result.best_epoch,
            "train_pairs": train.num_pairs,
            "eval_pairs": evaluation.num_pairs,
        },
    )
    adapter = result.model.to_adapter(config, result.best_states)
    adapter.save(cfg.checkpoint_dir)
    report = {
        "settings": settings,
        "seconds": round(result.seconds, 2),
        "history": result.history,
        "eval_probe_accuracy": result.eval_accuracy,
        "best_epoch": result.best_epoch,
        "train_pairs": train.num_pairs,
        "eval_pairs": evaluation.num_pairs,
    }
    _write_json(cfg.out / "fit.json", report)
    return report


def _fit_steering(
    cfg: RunConfig, settings: dict[str, Any], train: PairSet, evaluation: PairSet, store: dict[str, Any]
) -> dict[str, Any]:
    steering = fit_steering(train, evaluation)
    config = HPRConfig(
        base_model=store["model"],
        hidden_size=train.hidden_size,
        num_layers=train.num_layers,
        layers=list(range(train.num_layers)),
        probe_accuracy=steering.eval_accuracy,
        method="steer",
        training={
            "method": "steer: mean positive minus mean negative activation over aligned train token pairs",
            "data": store["data"]["source"],
            "extract": store["options"],
            "train_pairs": train.num_pairs,
            "eval_pairs": evaluation.num_pairs,
        },
    )
    steering.to_adapter(config).save(cfg.checkpoint_dir)
    norms = steering.vectors.norm(dim=-1).tolist()
    report = {
        "settings": settings,
        "seconds": round(steering.seconds, 2),
        "eval_probe_accuracy": steering.eval_accuracy,
        "vector_norm": {layer: round(norm, 4) for layer, norm in enumerate(norms)},
        "train_pairs": train.num_pairs,
        "eval_pairs": evaluation.num_pairs,
    }
    _write_json(cfg.out / "fit.json", report)
    return report


def stage_select(cfg: RunConfig) -> dict[str, Any]:
    adapter = HPRAdapter.load(cfg.checkpoint_dir)
    accuracy = adapter.config.probe_accuracy
    selected = select_layers(accuracy, cfg.top_k, cfg.min_accuracy)
    adapter.config.selected_layers = selected
    adapter.config.training["selection"] = {"top_k": cfg.top_k, "min_accuracy": cfg.min_accuracy}
    # What a request that gives none is served with, and what `eval` scores unless told otherwise.
    adapter.config.default_alpha = cfg.alpha if cfg.alpha is not None else DEFAULT_ALPHA[adapter.config.method]
    adapter.config.default_scope = cfg.scope or "all"
    adapter.config.default_edit_tokens = cfg.edit_tokens if isinstance(cfg.edit_tokens, int) else None
    adapter.save(cfg.checkpoint_dir)
    plot = plot_probe_accuracy(accuracy, selected, cfg.checkpoint_dir / "probe_accuracy.png")
    return {"selected_layers": selected, "selected_accuracy": {k: accuracy[k] for k in selected}, "plot": str(plot)}


# --- eval ---------------------------------------------------------------------------------------------------------


def _mean(scores: list[MCScore], metric: str) -> float:
    return float(sum(getattr(s, metric) for s in scores) / max(len(scores), 1))


def sweep(
    cfg: RunConfig,
    lm: LoadedModel,
    adapter: HPRAdapter,
    questions: list[D.Question],
    scope: Scope,
    tokens: EditTokens = "all",
) -> dict[str, Any]:
    """MC1/MC2 on the eval split for each (top-k, alpha), edited over ``scope`` and ``tokens`` as the test split
    is; never touches the test split."""
    base = score_questions(lm.model, lm.tokenizer, questions, desc="sweep base", progress=cfg.progress)
    rows = []
    acc = adapter.config.probe_accuracy
    for k in cfg.sweep_k or (cfg.top_k or 5,):
        layers = select_layers(acc, k)
        for alpha in cfg.sweep_alpha or (cfg.alpha if cfg.alpha is not None else adapter.config.default_alpha,):
            edited = score_edited(
                lm.model,
                lm.tokenizer,
                questions,
                adapter,
                layers,
                alpha,
                scope,
                tokens,
                desc=f"sweep k={k} a={alpha}",
                progress=cfg.progress,
            )
            s = summarize(base, edited, samples=cfg.bootstrap, seed=cfg.seed)
            rows.append({"top_k": k, "alpha": alpha, "layers": layers, "scope": scope, "edit_tokens": tokens, **s})
    best = max(rows, key=lambda r: r["mc1"]["delta"] + r["mc2"]["delta"])
    return {
        "split": "eval",
        "questions": len(questions),
        "base": {"mc1": _mean(base, "mc1"), "mc2": _mean(base, "mc2")},
        "results": rows,
        "best": {"top_k": best["top_k"], "alpha": best["alpha"]},
    }


def stage_eval(cfg: RunConfig, cache: dict[str, LoadedModel], required: bool = True) -> dict[str, Any]:
    """MC1/MC2 base vs edited. With ``required=False`` (``run`` on a pair file), data without MC targets is
    skipped with a note instead of an error."""
    ds = load_dataset(cfg)
    if cfg.eval_split not in ds.splits:
        raise TrainerError(f"unknown eval split {cfg.eval_split!r}")
    # MC1/MC2 are defined on TruthfulQA's MC answers, also when training used the CSV's (--answers csv).
    questions = [q for q in ds.mc_splits[cfg.eval_split] if q.mc1_correct is not None]
    if not questions:
        reason = f"the {cfg.eval_split} split has no TruthfulQA MC questions (mc1/mc2 targets) to evaluate"
        if required:
            raise TrainerError(reason)
        return {"skipped": reason}
    adapter_cfg = json.loads((cfg.checkpoint_dir / CONFIG_NAME).read_text())
    # The checkpoint is the source of truth for the edit; --alpha / --scope override it.
    alpha: float = cfg.alpha if cfg.alpha is not None else float(adapter_cfg.get("default_alpha", 1.0))
    scope: Scope = "generated" if (cfg.scope or adapter_cfg.get("default_scope", "all")) == "generated" else "all"
    recorded = adapter_cfg.get("default_edit_tokens")
    tokens: EditTokens = cfg.edit_tokens if cfg.edit_tokens is not None else recorded if recorded is not None else "all"
    settings = {
        "split": cfg.eval_split,
        "indices": [q.index for q in questions],
        "alpha": alpha,
        "scope": scope,
        "edit_tokens": tokens,
        "top_k": cfg.top_k,
        "min_accuracy": cfg.min_accuracy,
        "sweep_k": list(cfg.sweep_k),
        "sweep_alpha": list(cfg.sweep_alpha),
        "pick_best": cfg.pick_best,
        "adapter": {
            "selected_layers": adapter_cfg.get("selected_layers"),
            "weights_sha256": hashlib.sha256((cfg.checkpoint_dir / WEIGHTS_NAME).read_bytes()).hexdigest(),
        },
    }
    previous = _read_json(cfg.out / "eval.json")
    if previous and previous.get("settings") == settings:
        log.info("eval: eval.json exists with the same settings, reused")
        return dict(previous)
    lm = get_model(cfg, cache)
    adapter = HPRAdapter.load(cfg.checkpoint_dir, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    start = time.perf_counter()
    report: dict[str, Any] = {"settings": settings, "model": lm.model_id, "checkpoint": str(cfg.checkpoint_dir)}
    layers = list(adapter.config.selected_layers)
    if cfg.sweep_k or cfg.sweep_alpha:
        report["sweep"] = sweep(cfg, lm, adapter, ds.mc_splits["eval"], scope, tokens)
        if cfg.pick_best:
            best = report["sweep"]["best"]
            layers, alpha = select_layers(adapter.config.probe_accuracy, best["top_k"]), best["alpha"]
            # What the test split is scored with is what the checkpoint serves from now on.
            adapter.config.selected_layers, adapter.config.default_alpha = layers, alpha
            adapter.config.training["selection"] = {
                **adapter.config.training.get("selection", {}),
                "top_k": best["top_k"],
                "picked_by": "--pick-best: the best MC1+MC2 gain of the eval-split sweep",
            }
            adapter.save(cfg.checkpoint_dir)
    workers = cfg.eval_workers
    if workers is None:  # processes of one thread each use the cores without threads spinning against each other
        workers = min(4, os.cpu_count() or 1) if len(questions) >= 64 else 1
    if workers > 1:
        job = ScoringJob(
            cfg.model,
            cfg.device,
            cfg.dtype,
            str(cfg.checkpoint_dir),
            tuple(layers),
            alpha,
            tuple(questions),
            scope,
            tokens,
        )
        base, edited = score_in_workers(job, workers)
    else:
        base = score_questions(lm.model, lm.tokenizer, questions, desc=f"{cfg.eval_split} base", progress=cfg.progress)
        edited = score_edited(
            lm.model,
            lm.tokenizer,
            questions,
            adapter,
            layers,
            alpha,
            scope,
            tokens,
            desc=f"{cfg.eval_split} edited",
            progress=cfg.progress,
        )
    report.update(summarize(base, edited, samples=cfg.bootstrap, seed=cfg.seed))
    report.update(
        {
            "split": cfg.eval_split,
            "questions": len(questions),
            "edit": {"layers": layers, "alpha": alpha, "scope": scope, "edit_tokens": tokens},
            "per_question": [
                {"index": b.index, "mc1_base": b.mc1, "mc1_edited": e.mc1, "mc2_base": b.mc2, "mc2_edited": e.mc2}
                for b, e in zip(base, edited, strict=True)
            ],
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    _write_json(cfg.out / "eval.json", report)
    return report


def run_all(cfg: RunConfig) -> dict[str, Any]:
    """Every stage, resuming whatever is already done in ``cfg.out``."""
    cache: dict[str, LoadedModel] = {}
    timings: dict[str, float] = {}
    out: dict[str, Any] = {}
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("data", lambda: stage_data(cfg)),
        ("extract", lambda: stage_extract(cfg, cache)),
        ("fit", lambda: stage_fit(cfg)),
        ("select", lambda: stage_select(cfg)),
        ("eval", lambda: {"skipped": "--skip-eval"} if cfg.skip_eval else stage_eval(cfg, cache, not cfg.pairs_file)),
    ]
    for name, stage in stages:
        t = time.perf_counter()
        out[name] = stage()
        timings[name] = round(time.perf_counter() - t, 2)
    out["timings"] = timings
    return out
