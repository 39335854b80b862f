"""``hpr-train eval``: scoring-mode MC1/MC2 of the checkpoint against the base model, and the eval-split sweep.

``OUT/eval.json``: MC1/MC2 base vs edited on the evaluated split, CIs, per-question scores, sweeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from hpr.checkpoint import CONFIG_NAME, WEIGHTS_NAME, HPRAdapter
from hpr.edit_spec import EditTokens
from hpr.editing import Scope
from hpr.model import LoadedModel
from trainer import data as D
from trainer.errors import TrainerError
from trainer.evaluate import MCScore, ScoringJob, score_edited, score_in_workers, score_questions, summarize
from trainer.run_config import RunConfig, get_model, load_dataset, read_json, write_json
from trainer.select import select_layers

log = logging.getLogger(__name__)


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
    previous = read_json(cfg.out / "eval.json")
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
    write_json(cfg.out / "eval.json", report)
    return report
