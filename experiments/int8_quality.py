"""What int8 weights cost in quality: scoring-mode TruthfulQA MC1/MC2 with ``--quantization int8``, next to fp32.

Scores the test split (lm-eval's 6-shot QA prompt, as ``hpr-train eval``) with the embedded SmolLM2 quantized to
int8 weights (torchao, as ``hpr-serve --quantization int8``): the base model and the adapter's MC-optimal edit
(``--alpha``, ``--scope``, the layers eval.json used). The fp32 figures are read from the run's ``eval.json``
(``hpr-train eval``), which scored the same questions the same way. Generation metrics: ``hpr-train eval-gen
--quantization int8``.

    .venv/bin/python experiments/int8_quality.py [--run runs/truthfulqa] [--alpha 2] [--scope all] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from hpr.checkpoint import HPRAdapter
from hpr.model import EMBEDDED_MODEL_ID, load_model
from trainer import data as D
from trainer.evaluate import score_edited, score_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/truthfulqa"))
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--scope", default="all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = json.loads((args.run / "eval.json").read_text())
    data_dir = D.default_data_dir()
    if data_dir is None:
        raise SystemExit("TruthfulQA not found: set HPR_TRUTHFULQA_DIR")
    questions = D.select(D.load_truthfulqa(data_dir), fp32["settings"]["indices"])  # the questions eval.json scored
    lm = load_model(EMBEDDED_MODEL_ID, "cpu", "float32", quantization="int8")
    adapter = HPRAdapter.load(args.run / "checkpoint", hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    layers: list[int] = list(fp32["edit"]["layers"])  # the edit eval.json scored
    started = time.perf_counter()
    with torch.inference_mode():
        base = score_questions(lm.model, lm.tokenizer, questions, desc="int8 base")
        edited = score_edited(
            lm.model, lm.tokenizer, questions, adapter, layers, args.alpha, args.scope, desc="int8 edit"
        )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"{len(questions)} test questions; edit layers {list(layers)}, alpha {args.alpha}, scope {args.scope}; "
          f"int8 scoring took {seconds:.0f} s")  # fmt: skip
    print("model | MC1 base → edited | MC2 base → edited")
    f = fp32
    print(f"fp32 (eval.json) | {f['mc1']['base']:.4f} → {f['mc1']['edited']:.4f} | "
          f"{f['mc2']['base']:.4f} → {f['mc2']['edited']:.4f}")  # fmt: skip
    mean = statistics.fmean
    print(f"int8 | {mean(s.mc1 for s in base):.4f} → {mean(s.mc1 for s in edited):.4f} | "
          f"{mean(s.mc2 for s in base):.4f} → {mean(s.mc2 for s in edited):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
