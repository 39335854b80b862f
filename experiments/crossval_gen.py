"""Is the served default's chat gain real? K-fold cross-validation of it on the train split, in generation mode.

The served default (format, alpha, scope, edited tokens: the Makefile's) was chosen on the 41 eval questions and
judged once on test (docs/quality.md). 41 questions are a small selection set, and test must not become a second
one. This experiment measures the same *recipe* on questions neither the choice nor test used: the 367 train questions,
split into ``--folds`` folds. For each fold it runs the product's own pipeline:

- ``hpr-train run`` on the other folds (``--splits-file``: train = the other folds, eval = the seed's eval split,
  which still selects the layers by probe accuracy, test = this fold), with the served default's settings;
- ``hpr-train eval-gen --split test`` on this fold: the base and the fold's served default, answered as a chat
  model through ``hpr-serve``, scored as ``make eval`` scores the test split (everyday questions left out).

Then it pools every fold's answers, judges them again with one perplexity threshold for "degenerate" (the pooled
base's 95th percentile), and prints the pooled differences with paired-bootstrap 95 % CIs (``OUT/pooled/``, the
same files as an ``eval-gen`` run). Each fold's finished run is kept and skipped when the script runs again.

``--sweep NAME --config SPEC …`` judges other configurations of the same recipe instead (``eval-gen``'s
``--config`` syntax without the adapter: ``NAME=[layers=L][:alpha=A][:scope=S][:tokens=N]``, unset fields at the
fold adapter's defaults): each fold's adapter is trained once, as above; the sweep's answers go to
``OUT/foldK/NAME/`` and ``OUT/pooled-NAME/``, with the docs' rule applied to the pooled results.
``--random-probe SEED`` makes such a sweep a null control: each fold's adapter with every layer's probe direction
``w`` replaced by a random one of the same norm (angle MLPs kept), so the edit is as large but points nowhere
learned. Each configuration's row also gives the share of answers whose text differs from the base's.

    .venv/bin/python experiments/crossval_gen.py [--out runs/crossval] [--folds 3] [--seed 0]
    .venv/bin/python experiments/crossval_gen.py --sweep s1 --config a025t4=alpha=0.25:tokens=4 --config …
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import torch

from hpr.checkpoint import HPRAdapter
from hpr.householder import HPRLayer
from trainer import data as D
from trainer.errors import TrainerError
from trainer.eval_gen import parse_config
from trainer.gen_report import (
    ANSWERS_FILE,
    BASE,
    DEFAULT_BOOTSTRAP,
    SUMMARY_FILE,
    choose,
    rejudge,
    summarise,
    write_run,
)

ROOT = Path(__file__).resolve().parents[1]
SERVED = "served"
ADAPTER = "fold"  # the fold's adapter, as a sweep's configurations name it
METRICS = ("bleu_acc", "rougeL_acc", "chat_mc1", "chat_mc2")


def makefile_default(name: str) -> str:
    """The served default's setting ``name`` (FORMAT, ALPHA, SCOPE, EDIT_TOKENS) as the Makefile writes it."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        key, sep, value = line.partition("?=")
        if sep and key.strip() == name:
            return value.strip()
    raise SystemExit(f"Makefile: no default for {name}")


def fold_splits(seed_splits: dict[str, list[int]], folds: int, seed: int) -> list[dict[str, list[int]]]:
    """One split per fold: train = the other folds, eval = the seed's eval split, test = this fold."""
    train = list(seed_splits["train"])
    random.Random(seed).shuffle(train)
    parts = [sorted(train[k::folds]) for k in range(folds)]
    rest = [sorted(i for j, p in enumerate(parts) if j != k for i in p) for k in range(folds)]
    return [{"train": rest[k], "eval": seed_splits["eval"], "test": part} for k, part in enumerate(parts)]


def sweep_spec(text: str) -> str:
    """``NAME=FIELDS`` as an eval-gen ``--config`` of the fold's adapter; a clear error when it does not parse."""
    name, _, fields = text.partition("=")
    if not name.isidentifier() or "=" not in fields:
        raise SystemExit(f"--config {text!r}: expected NAME=FIELDS, e.g. a025t4=alpha=0.25:tokens=4")
    spec = f"{name}={ADAPTER}:{fields}"
    try:
        parse_config(spec)
    except TrainerError as exc:
        raise SystemExit(f"--config {text!r}: {exc}") from exc
    return spec


def random_probe_copy(checkpoint: Path, out: Path, seed: int) -> Path:
    """``checkpoint`` with every layer's probe direction replaced by a seeded random one of the same norm."""
    adapter = HPRAdapter.load(checkpoint)
    for layer in adapter.layers:
        module = adapter.layer(layer)
        if not isinstance(module, HPRLayer):
            raise SystemExit(f"--random-probe: {checkpoint} is not an HPR adapter")
        # Not torch's stream for a small seed: the trainer seeds torch with the run's seed (0), and a probe keeps
        # part of its initial weights (cosine ≈ −0.2 with randn from seed 0), so that "random" direction is not.
        generator = torch.Generator().manual_seed(random.Random(f"null-probe {seed} {layer}").getrandbits(63))
        weight = module.probe.weight
        direction = torch.randn(tuple(weight.shape), generator=generator)
        weight.copy_(direction * weight.norm() / direction.norm())
    adapter.config.training = {**adapter.config.training, "null_control": f"probe directions random (seed {seed})"}
    return adapter.save(out)


def served_run_matches(fold: Path, settings: dict[str, str]) -> bool:
    """Whether the fold's stored answers are the served default's at ``settings`` (else they are judged again)."""
    try:
        applied = json.loads((fold / SUMMARY_FILE).read_text())["configs"][SERVED]["applied"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    tokens = settings["EDIT_TOKENS"]
    return bool(
        applied["alpha"] == float(settings["ALPHA"])
        and applied["scope"] == settings["SCOPE"]
        and str(applied.get("edit_tokens", "all")) == tokens
    )


def pooled_configs(names: list[str], fold_configs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each configuration as the folds applied it, its layers one list per fold (the probe picks them per fold)."""
    out: dict[str, Any] = {}
    for name in names:
        applied = [c[name]["applied"] for c in fold_configs]
        if applied[0] is None:  # the base
            out[name] = {"applied": None}
            continue
        out[name] = {"applied": {**applied[0], "layers": [a["layers"] for a in applied]}}
    return out


def changed(rows: list[dict[str, Any]], name: str) -> float:
    """The share of questions whose answer under ``name`` differs from the base's."""
    return sum(bool(r["answers"][name]["text"] != r["answers"][BASE]["text"]) for r in rows) / len(rows)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/crossval"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the train questions into folds [0]")
    parser.add_argument("--data-dir", type=Path, default=None, help="TruthfulQA directory [hpr-train's default]")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP)
    parser.add_argument("--sweep", default=None, help="judge --config configurations under this name instead")
    parser.add_argument(
        "--random-probe", type=int, default=None, metavar="SEED",
        help="with --sweep: the fold adapters' probe directions replaced by random ones of the same norm",
    )  # fmt: skip
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=[layers=L][:alpha=A][:scope=S][:tokens=N]",
        help="with --sweep: a configuration of the fold's adapter; repeatable",
    )  # fmt: skip
    args = parser.parse_args()
    if args.folds < 2:
        raise SystemExit("--folds must be ≥ 2")
    if bool(args.sweep) != bool(args.config):
        raise SystemExit("--sweep and --config go together")
    if args.random_probe is not None and not args.sweep:
        raise SystemExit("--random-probe needs --sweep")
    specs = [sweep_spec(text) for text in args.config]
    names = [BASE, *(spec.partition("=")[0] for spec in specs)] if specs else [BASE, SERVED]
    if len(set(names)) != len(names) or (args.sweep and not args.sweep.isidentifier()):
        raise SystemExit("--sweep must be a plain name and each --config NAME distinct (and not 'base')")
    data_dir = args.data_dir or D.default_data_dir()
    if data_dir is None:
        raise SystemExit("no TruthfulQA directory: pass --data-dir or set HPR_TRUTHFULQA_DIR")
    questions = D.load_truthfulqa(data_dir)
    seed_splits = D.load_splits(data_dir / D.SPLITS_FILE, len(questions))
    out = args.out if args.out.is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    settings = {k: makefile_default(k) for k in ("FORMAT", "ALPHA", "SCOPE", "EDIT_TOKENS")}
    print(f"served default {settings}; {len(seed_splits['train'])} train questions in {args.folds} folds", flush=True)
    rows: list[dict[str, Any]] = []
    fold_configs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for k, split in enumerate(fold_splits(seed_splits, args.folds, args.seed)):
        fold = out / f"fold{k}"
        fold.mkdir(exist_ok=True)
        splits_file = fold / "splits.json"
        splits_file.write_text(json.dumps(split))
        data = ["--data-dir", str(data_dir), "--splits-file", str(splits_file)]
        # Resumes: trains once, later runs only record the settings as the checkpoint's defaults.
        run([
            str(bin_dir / "hpr-train"), "run", "--out", str(fold), *data, "--format", settings["FORMAT"],
            "--alpha", settings["ALPHA"], "--scope", settings["SCOPE"], "--edit-tokens", settings["EDIT_TOKENS"],
            "--skip-eval", "--no-progress",
        ])  # fmt: skip
        if not args.sweep and not served_run_matches(fold, settings):
            run([
                str(bin_dir / "hpr-train"), "eval-gen", "--out", str(fold), "--data-dir", str(data_dir), "--split",
                "test", "--config", f"{SERVED}={fold.name}", "--no-chat-questions", "--no-progress",
            ])  # fmt: skip
        answers = fold
        if args.sweep:
            answers = fold / args.sweep
            answers.mkdir(exist_ok=True)
            (answers / "data.json").write_text((fold / "data.json").read_text())  # the fold's split
            checkpoint = fold / "checkpoint"
            if args.random_probe is not None:
                checkpoint = answers / "checkpoint-random"
                if not checkpoint.is_dir() and not (answers / SUMMARY_FILE).is_file():
                    random_probe_copy(fold / "checkpoint", checkpoint, args.random_probe)
            if (answers / SUMMARY_FILE).is_file():
                stored = json.loads((answers / SUMMARY_FILE).read_text())["configs"]
                null = (answers / "checkpoint-random").is_dir()
                if set(stored) != set(names) or null != (args.random_probe is not None):
                    held = f"{sorted(stored)}, random probe: {null}"
                    raise SystemExit(f"{answers} holds another sweep ({held}): choose another --sweep")
            else:
                run([
                    str(bin_dir / "hpr-train"), "eval-gen", "--out", str(answers), "--data-dir", str(data_dir),
                    "--split", "test", "--adapter", f"{ADAPTER}={checkpoint}",
                    *(a for spec in specs for a in ("--config", spec)), "--no-chat-questions", "--no-progress",
                ])  # fmt: skip
        layers = json.loads((fold / "checkpoint" / "hpr_config.json").read_text()).get("selected_layers")
        fold_configs.append(json.loads((answers / SUMMARY_FILE).read_text())["configs"])
        fold_rows = [json.loads(line) for line in (answers / ANSWERS_FILE).read_text().splitlines() if line.strip()]
        print(f"fold {k}: {len(split['test'])} questions, layers {layers}", flush=True)
        rows.extend(fold_rows)
    rejudge(names, rows)  # one degenerate threshold: the pooled base's 95th percentile of perplexity
    results = summarise(names, rows, args.bootstrap, args.seed)
    configs = pooled_configs(names, fold_configs)
    report = {
        "crossval": {"folds": args.folds, "seed": args.seed, "settings": settings, "questions": len(rows)},
        "configs": configs,
        "results": results,
        "rule": choose(results),
        "bootstrap": {"samples": args.bootstrap, "seed": args.seed},
    }
    write_run(out / (f"pooled-{args.sweep}" if args.sweep else "pooled"), report, rows)
    base = results[BASE]["truthfulqa"]
    print(f"\npooled over {len(rows)} train questions (held out by fold), {time.perf_counter() - started:.0f} s")
    print("base: " + ", ".join(f"{m} {100 * base[m]['value']:.1f}" for m in METRICS if m in base))
    head = " | ".join(f"Δ {m} (95 % CI)" for m in METRICS)
    print(f"config | {head} | ppl × base | Δ degenerate | guard | answers changed")
    for name in names[1:]:
        t = results[name]["truthfulqa"]
        cells = []
        for metric in METRICS:
            if metric not in t:
                cells.append("—")
                continue
            lo, hi = t[metric]["delta_ci95"]
            cells.append(f"{100 * t[metric]['delta']:+.1f} ({100 * lo:+.1f} … {100 * hi:+.1f})")
        fluency, holds = t["fluency"], results[name]["guard"]["holds"]
        print(
            f"{name} | " + " | ".join(cells) + f" | {fluency['perplexity_ratio']:.2f} | "
            f"{100 * fluency['degenerate']['delta']:+.1f} | {'holds' if holds else 'fails'} | {changed(rows, name):.0%}"
        )
    print("rule:", json.dumps(report["rule"]))


if __name__ == "__main__":
    main()
