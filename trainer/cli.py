"""``hpr-train``: build an HPR checkpoint from contrastive answer pairs and evaluate it on TruthfulQA MC1/MC2.

hpr-train run --out runs/truthfulqa                 # every stage; re-running resumes
hpr-train run --out runs/smoke --max-questions 8    # the same pipeline on a subset
hpr-train {data,extract,fit,select,eval} --out DIR  # one stage (earlier stages must have run)
hpr-train eval-gen --out DIR --split eval            # the edit as a chat model: answers through hpr-serve
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hpr.edit_spec import EditTokens, parse_edit_tokens
from hpr.errors import HPRError
from hpr.model import EMBEDDED_MODEL_ID
from trainer import pipeline as P
from trainer.activations import ExtractOptions
from trainer.cli_eval_gen import add_eval_gen_parser, run_eval_gen_cli
from trainer.fit import FitOptions
from trainer.mc_eval import stage_eval
from trainer.prompts import FORMATS
from trainer.run_config import RunConfig, set_threads


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _edit_tokens(text: str) -> EditTokens:
    try:
        return parse_edit_tokens(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _ratios(text: str) -> tuple[float, float, float]:
    values = _floats(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected TRAIN,EVAL,TEST ratios, got {text!r}")
    return values[0], values[1], values[2]


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="output directory (checkpoint/, activations/, eval.json)")
    g.add_argument(
        "--model",
        default=EMBEDDED_MODEL_ID,
        help=f"base model: HF directory, .gguf file, hub id, or {EMBEDDED_MODEL_ID} (default)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA if present) [auto]")
    g.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16 [auto]",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads [all cores but one: spinning threads on a busy CPU are much slower]",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of choice shuffling, pair sampling, init and batches [0]")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="log every step")

    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="TruthfulQA directory with mc_task.json [$HPR_TRUTHFULQA_DIR or ../shared/data/truthfulqa]",
    )
    d.add_argument(
        "--pairs-file",
        type=Path,
        default=None,
        help='your own JSONL of {"question", "positive", "negative"} lines (instead of TruthfulQA)',
    )
    d.add_argument("--hub", action="store_true", help="load TruthfulQA from the Hugging Face hub (online users)")
    d.add_argument(
        "--splits-file",
        type=Path,
        default=None,
        help="JSON {train, eval, test} of question indices [DATA_DIR/ids_splits.json, the seed's split]",
    )
    d.add_argument(
        "--split-ratios",
        type=_ratios,
        default=None,
        metavar="TRAIN,EVAL,TEST",
        help="split by seeded shuffle with these ratios instead of a split file, e.g. 0.45,0.05,0.5",
    )
    d.add_argument(
        "--format",
        choices=FORMATS,
        default="qa",
        help="prompt format: mc = the seed's chat-template multiple-choice prompt; chat = bare question "
        "in the chat template; qa = the 6-shot 'Q: … A:' primer, as scored by the evaluation [qa]",
    )
    d.add_argument(
        "--answers",
        choices=("mc2", "csv"),
        default="mc2",
        help="answer texts to train on: mc2 targets of mc_task.json, or the generation answers of TruthfulQA.csv; "
        "MC1/MC2 are always scored on mc_task.json's standard targets [mc2]",
    )
    d.add_argument("--max-questions", type=int, default=None, help="use only the first N questions of each split")
    d.add_argument(
        "--max-pairs-per-question",
        type=int,
        default=None,
        help="sample at most N (correct, incorrect) pairs per train question [all: the seed's setting]",
    )

    x = p.add_argument_group("extract")
    x.add_argument(
        "--max-identical",
        type=float,
        default=0.75,
        help="drop pairs whose aligned responses share ≥ this fraction of token ids (seed: 0.75)",
    )
    x.add_argument(
        "--keep-shared-prefix",
        action="store_true",
        help="also train on the positions of a pair's common token prefix (seed behaviour)",
    )
    x.add_argument(
        "--store-dtype", choices=("float16", "float32"), default="float16", help="dtype of stored activations [float16]"
    )
    x.add_argument("--shard-mb", type=int, default=256, help="activation shard size, bounds extraction RAM [256]")
    x.add_argument("--batch-tokens", type=int, default=2048, help="max padded tokens per forward pass [2048]")

    f = p.add_argument_group("fit")
    f.add_argument(
        "--method",
        choices=P.METHODS,
        default="hpr",
        help="edit method to train: hpr (probe + angle MLP, the options below) or steer (an additive steering "
        "vector per layer: mean positive minus mean negative activation; no options) [hpr]",
    )
    f.add_argument("--epochs", type=int, default=5, help="training epochs [5]")
    f.add_argument("--batch-size", type=int, default=16, help="pairs per batch (each with all its aligned tokens) [16]")
    f.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate [5e-4]")
    f.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay [0.01]")
    f.add_argument("--warmup", type=float, default=0.05, help="share of steps of linear warmup [0.05]")
    f.add_argument(
        "--shuffle",
        choices=("questions", "pairs"),
        default="questions",
        help="batch order: questions shuffled, a question's pairs kept together (shares tokens, faster) "
        "or every pair shuffled independently [questions]",
    )
    f.add_argument("--angle-layers", type=int, default=4, help="linear layers of the angle MLP (seed: 4) [4]")
    f.add_argument("--max-ram-mb", type=int, default=8192, help="refuse to load more activations than this [8192]")

    s = p.add_argument_group("select / eval")
    s.add_argument(
        "--top-k",
        type=int,
        default=3,
        help="edit the k layers with the best eval probe accuracy [3, chosen on the eval split; seed: 5]",
    )
    s.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="instead: every layer with eval probe accuracy ≥ this (capped by --top-k)",
    )
    s.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="select: the strength recorded in the checkpoint as default_alpha [2.0, the scoring-mode MC optimum "
        "on the eval split]; eval: the strength to score [the checkpoint's default_alpha]",
    )
    s.add_argument(
        "--scope",
        choices=("all", "generated"),
        default=None,
        help="select: the positions recorded as default_scope [all]; eval: the scope to score "
        "[the checkpoint's default_scope]",
    )
    s.add_argument(
        "--edit-tokens",
        type=_edit_tokens,
        default=None,
        metavar="N|all",
        help="select: how many generated tokens a request edits, recorded as default_edit_tokens [all]; eval: "
        "the limit to score (the answer's first N tokens from edited states) [the checkpoint's]",
    )
    s.add_argument(
        "--eval-split", choices=("test", "eval", "train"), default="test", help="split to report MC1/MC2 on [test]"
    )
    s.add_argument(
        "--sweep-k",
        type=_ints,
        default=(),
        metavar="K1,K2",
        help="also score these top-k values on the eval split (never test)",
    )
    s.add_argument(
        "--sweep-alpha",
        type=_floats,
        default=(),
        metavar="A1,A2",
        help="also score these alphas on the eval split (never test)",
    )
    s.add_argument(
        "--pick-best",
        action="store_true",
        help="evaluate the test split with the sweep's best (k, alpha) on the eval split, and write them into the "
        "checkpoint (selected_layers, default_alpha)",
    )
    s.add_argument(
        "--eval-workers",
        type=int,
        default=None,
        help="score the evaluated split in N processes of one thread each [one per core, max 4, for 64+ questions]",
    )
    s.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples for the CIs [10000]")
    s.add_argument(
        "--skip-eval",
        action="store_true",
        help="run: stop after select (train a checkpoint to serve; evaluate later with `hpr-train eval`)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        out=args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        data_dir=args.data_dir,
        pairs_file=args.pairs_file,
        splits_file=args.splits_file,
        split_ratios=args.split_ratios,
        hub=args.hub,
        format=args.format,
        answers=args.answers,
        max_questions=args.max_questions,
        max_pairs_per_question=args.max_pairs_per_question,
        seed=args.seed,
        extract=ExtractOptions(
            max_identical=args.max_identical,
            keep_shared_prefix=args.keep_shared_prefix,
            store_dtype=args.store_dtype,
            shard_mb=args.shard_mb,
            batch_tokens=args.batch_tokens,
        ),
        method=args.method,
        fit=FitOptions(
            epochs=args.epochs,
            batch_pairs=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            seed=args.seed,
            shuffle=args.shuffle,
            angle_layers=args.angle_layers,
        ),
        max_ram_mb=args.max_ram_mb,
        top_k=args.top_k,
        min_accuracy=args.min_accuracy,
        alpha=args.alpha,
        scope=args.scope,
        edit_tokens=args.edit_tokens,
        eval_split=args.eval_split,
        sweep_k=args.sweep_k,
        sweep_alpha=args.sweep_alpha,
        pick_best=args.pick_best,
        bootstrap=args.bootstrap,
        eval_workers=args.eval_workers,
        skip_eval=args.skip_eval,
        progress=not args.no_progress,
    )


STAGES: dict[str, tuple[str, Callable[[RunConfig, dict[str, Any]], Any]]] = {
    "run": ("every stage end to end (resumes whatever is done)", lambda c, m: P.run_all(c)),
    "data": ("load and split the data, write OUT/data.json", lambda c, m: P.stage_data(c)),
    "extract": ("cache decoder-layer activations of train/eval pairs in OUT/activations", P.stage_extract),
    "fit": (
        "train every layer's module (--method), write OUT/checkpoint and OUT/fit.json",
        lambda c, m: P.stage_fit(c),
    ),
    "select": ("choose layers by eval probe accuracy, plot it", lambda c, m: P.stage_select(c)),
    "eval": ("TruthfulQA MC1/MC2 base vs edited, write OUT/eval.json", stage_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpr-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, _fn) in STAGES.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    add_eval_gen_parser(sub)
    return parser


def _summary(stage: str, result: Any) -> str:
    if stage == "run" and "skipped" in result["eval"]:
        return f"eval skipped: {result['eval']['skipped']}; selected layers {result['select']['selected_layers']}"
    if stage == "eval" or (stage == "run" and "eval" in result):
        ev = result["eval"] if stage == "run" else result
        lines = [
            f"{m.upper()}: base {ev[m]['base']:.4f}  edited {ev[m]['edited']:.4f}  delta {ev[m]['delta']:+.4f} "
            f"(95% CI {ev[m]['delta_ci95'][0]:+.4f} … {ev[m]['delta_ci95'][1]:+.4f})"
            for m in ("mc1", "mc2")
        ]
        if stage == "run":
            lines.append(f"selected layers {result['select']['selected_layers']}; timings (s) {result['timings']}")
        return "\n".join(lines)
    return json.dumps(result, indent=2, sort_keys=True, default=str)[:4000]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.stage == "eval-gen":
        return run_eval_gen_cli(args)
    cfg = config_from_args(args)
    set_threads(cfg.threads)
    start = time.perf_counter()
    try:
        result = STAGES[args.stage][1](cfg, {})
    except (HPRError, ValueError) as exc:
        print(f"hpr-train {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(args.stage, result))
    print(f"hpr-train {args.stage}: done in {time.perf_counter() - start:.1f} s ({cfg.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
