"""Model selection for a trained run, on the EVAL split only: MC1/MC2 for each (top-k, alpha).

    .venv/bin/python experiments/trainer_sweep.py --out runs/truthfulqa --k 1,3,5,8 --alpha 0.5,1,2 [--split eval]

Reads OUT/checkpoint, scores the base model once and the edited model per setting, prints a table and writes
OUT/sweep-<split>.json. ``--split train-holdout`` scores the last ``--holdout`` train questions instead (questions
the probes were trained on: use only as a second, biased opinion). The test split is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hpr.checkpoint import HPRAdapter
from hpr.model import load_model
from trainer.data import default_data_dir, load_splits, load_truthfulqa, select
from trainer.evaluate import MCScore, score_edited, score_questions, summarize
from trainer.select import select_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory with checkpoint/")
    parser.add_argument("--k", default="1,3,5,8", help="top-k values [1,3,5,8]")
    parser.add_argument("--alpha", default="0.5,1,2", help="alphas [0.5,1,2]")
    parser.add_argument("--layers", default="", help="extra explicit layer sets, ';'-separated, e.g. '10,11;20'")
    parser.add_argument("--split", default="eval", choices=("eval", "train-holdout"), help="questions to score")
    parser.add_argument("--holdout", type=int, default=60, help="train questions for train-holdout [60]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    if data_dir is None:
        raise SystemExit("TruthfulQA not found: set HPR_TRUTHFULQA_DIR")
    qs = load_truthfulqa(data_dir)
    run_data = args.out / "data.json"  # the run's own split (it may have used --split-ratios or --splits-file)
    if run_data.is_file():
        splits = {k: v["indices"] for k, v in json.loads(run_data.read_text())["splits"].items()}
    else:
        splits = load_splits(data_dir / "ids_splits.json", len(qs))
    ids = splits["eval"] if args.split == "eval" else splits["train"][-args.holdout :]
    questions = select(qs, ids)
    lm = load_model(args.model)
    adapter = HPRAdapter.load(args.out / "checkpoint", hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    acc = adapter.config.probe_accuracy
    settings: list[tuple[str, list[int], float]] = []
    for alpha in (float(a) for a in args.alpha.split(",")):
        for k in (int(x) for x in args.k.split(",")):
            settings.append((f"top{k}", select_layers(acc, k), alpha))
        for spec in filter(None, args.layers.split(";")):
            settings.append((spec, [int(x) for x in spec.split(",")], alpha))
    base_file = args.out / f"sweep-{args.split}-base.json"  # the base model's scores do not depend on the edit
    if base_file.is_file() and json.loads(base_file.read_text())["indices"] == ids:
        base = [MCScore(**s) for s in json.loads(base_file.read_text())["scores"]]
    else:
        base = score_questions(lm.model, lm.tokenizer, questions, progress=False)
        base_file.write_text(json.dumps({"indices": ids, "scores": [vars(s) for s in base]}) + "\n")
    rows = []
    print(
        f"{args.split}: {len(questions)} questions; base MC1 {sum(s.mc1 for s in base) / len(base):.4f} "
        f"MC2 {sum(s.mc2 for s in base) / len(base):.4f}"
    )
    for name, layers, alpha in settings:
        edited = score_edited(lm.model, lm.tokenizer, questions, adapter, layers, alpha, progress=False)
        s = summarize(base, edited, samples=2000)
        rows.append({"name": name, "layers": layers, "alpha": alpha, **s})
        print(
            f"{name:>10s} alpha {alpha:4.2f} layers {layers}: MC1 {s['mc1']['edited']:.4f} ({s['mc1']['delta']:+.4f}) "
            f"MC2 {s['mc2']['edited']:.4f} ({s['mc2']['delta']:+.4f})",
            flush=True,
        )
    out = args.out / f"sweep-{args.split}.json"
    out.write_text(json.dumps({"split": args.split, "questions": len(questions), "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
