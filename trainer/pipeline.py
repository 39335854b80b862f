"""The stages of ``hpr-train`` over one output directory; each skips itself when its output is already there.

``OUT/data.json``            the questions of each split (indices), the prompt format, pair counts
``OUT/activations/{train,eval}``  activation stores (see trainer/store.py)
``OUT/checkpoint/``          the adapter (hpr_config.json + hpr_model.safetensors) + probe_accuracy.png; its method is
                           ``--method``: ``hpr`` (default) or ``steer`` (a steering vector, trainer/steer.py)
``OUT/fit.json``             per-epoch training loss and eval probe accuracy per layer (steer: accuracy only)
``OUT/eval.json``            written by the last stage, the scoring-mode evaluation (trainer/mc_eval.py)

The run's options, data and model: trainer/run_config.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from hpr.checkpoint import CONFIG_NAME, HPRAdapter, HPRConfig
from hpr.householder import default_widths
from hpr.model import LoadedModel
from trainer.activations import Extractor, store_settings
from trainer.errors import TrainerError
from trainer.fit import fit
from trainer.mc_eval import stage_eval
from trainer.pairs import PairSet
from trainer.prompts import encode_all
from trainer.run_config import Dataset, RunConfig, get_model, load_dataset, read_json, write_json
from trainer.select import plot_probe_accuracy, select_layers
from trainer.steer import fit_steering
from trainer.store import ActivationStore

log = logging.getLogger(__name__)

SCORING_ALPHA = 2.0  # the scoring-mode MC optimum on the eval split (docs/trainer.md)
# What `select` records as default_alpha when --alpha is not given, per method ("steer": the plain mean difference).
DEFAULT_ALPHA = {"hpr": SCORING_ALPHA, "steer": 1.0}
METHODS = tuple(DEFAULT_ALPHA)


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
    write_json(cfg.out / "data.json", summary)
    return summary


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
    previous = read_json(cfg.out / "fit.json")
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
    write_json(cfg.out / "fit.json", report)
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
    write_json(cfg.out / "fit.json", report)
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
