"""Is the served default's chat gain real? K-fold cross-validation of it on the train split, in generation mode.

The served default (format, alpha, scope, edited tokens: the Makefile's) was chosen on the 41 eval questions and
judged once on test (docs/quality.md). 41 questions are a small selection set, and test must not become a second
one. This bench measures the same *recipe* on questions neither the choice nor test used: the 367 train questions,
split into ``--folds`` folds. For each fold it runs the product's own pipeline:

- ``hpr-train run`` on the other folds (``--splits-file``: train = the other folds, eval = the seed's eval split,
  which still selects the layers by probe accuracy, test = this fold), with the served default's settings;
- ``hpr-train eval-gen --split test`` on this fold: the base and the fold's served default, answered as a chat
  model through ``hpr-serve``, scored as ``make eval`` scores the test split (everyday questions left out).

Then it pools every fold's answers, judges them again with one perplexity threshold for "degenerate" (the pooled
base's 95th percentile), and prints the pooled differences with paired-bootstrap 95 % CIs (``OUT/pooled/``, the
same files as an ``eval-gen`` run). Each fold's finished run is kept and skipped when the bench runs again.

    .venv/bin/python bench/crossval_gen.py [--out runs/crossval] [--folds 3] [--seed 0]
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

from trainer import data as D
from trainer.gen_report import ANSWERS_FILE, BASE, DEFAULT_BOOTSTRAP, SUMMARY_FILE, rejudge, summarise, write_run

ROOT = Path(__file__).resolve().parents[1]
SERVED = "served"
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
    args = parser.parse_args()
    if args.folds < 2:
        raise SystemExit("--folds must be ≥ 2")
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
    started = time.perf_counter()
    for k, split in enumerate(fold_splits(seed_splits, args.folds, args.seed)):
        fold = out / f"fold{k}"
        fold.mkdir(exist_ok=True)
        splits_file = fold / "splits.json"
        splits_file.write_text(json.dumps(split))
        if not (fold / SUMMARY_FILE).is_file():
            data = ["--data-dir", str(data_dir), "--splits-file", str(splits_file)]
            run([
                str(bin_dir / "hpr-train"), "run", "--out", str(fold), *data, "--format", settings["FORMAT"],
                "--alpha", settings["ALPHA"], "--scope", settings["SCOPE"], "--edit-tokens", settings["EDIT_TOKENS"],
                "--skip-eval", "--no-progress",
            ])  # fmt: skip
            run([
                str(bin_dir / "hpr-train"), "eval-gen", "--out", str(fold), "--data-dir", str(data_dir), "--split",
                "test", "--config", f"{SERVED}={fold.name}", "--no-chat-questions", "--no-progress",
            ])  # fmt: skip
        layers = json.loads((fold / "checkpoint" / "hpr_config.json").read_text()).get("selected_layers")
        fold_rows = [json.loads(line) for line in (fold / ANSWERS_FILE).read_text().splitlines() if line.strip()]
        print(f"fold {k}: {len(split['test'])} questions, layers {layers}", flush=True)
        rows.extend(fold_rows)
    rejudge([BASE, SERVED], rows)  # one degenerate threshold: the pooled base's 95th percentile of perplexity
    results = summarise([BASE, SERVED], rows, args.bootstrap, args.seed)
    report = {
        "crossval": {"folds": args.folds, "seed": args.seed, "settings": settings, "questions": len(rows)},
        "configs": {BASE: {}, SERVED: settings},
        "results": results,
        "bootstrap": {"samples": args.bootstrap, "seed": args.seed},
    }
    write_run(out / "pooled", report, rows)
    served, base = results[SERVED]["truthfulqa"], results[BASE]["truthfulqa"]
    print(f"\npooled over {len(rows)} train questions (held out by fold), {time.perf_counter() - started:.0f} s")
    print("metric | base | served | Δ (points) | 95 % CI")
    for metric in METRICS:
        if metric in served:
            d = served[metric]
            lo, hi = d["delta_ci95"]
            print(
                f"{metric} | {100 * base[metric]['value']:.1f} | {100 * d['value']:.1f} | {100 * d['delta']:+.1f} | "
                f"{100 * lo:+.1f} … {100 * hi:+.1f}"
            )
    fluency = served["fluency"]
    print(f"median perplexity ×{fluency['perplexity_ratio']:.2f} the base's")
    for key in ("degenerate", "non_answer", "rep4"):
        lo, hi = fluency[key]["delta_ci95"]
        share, delta = 100 * fluency[key]["value"], 100 * fluency[key]["delta"]
        print(f"{key}: {share:.1f} % ({delta:+.1f}; {100 * lo:+.1f} … {100 * hi:+.1f})")
    print("guard holds:", results[SERVED]["guard"]["holds"])


if __name__ == "__main__":
    main()
