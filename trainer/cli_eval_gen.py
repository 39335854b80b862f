"""The ``hpr-train eval-gen`` subcommand: flags, and the printed summary."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpr.errors import HPRError
from hpr.model import EMBEDDED_MODEL_ID, QUANTIZATIONS
from trainer.eval_gen import EditConfig, EvalGenOptions, parse_config, run_eval_gen
from trainer.gen_report import BASE, DEFAULT_BOOTSTRAP, DEFAULT_SEED, rescore

CHAT_QUESTIONS = Path(__file__).with_name("chat_questions.txt")


# Options that choose what to generate: meaningless with --rescore, which judges answers already generated.
RESCORE_IGNORES = {"--adapter": "adapter", "--config": "config", "--base-url": "base_url"}


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), Path(path.strip())


def _config(text: str) -> EditConfig:
    try:
        return parse_config(text)
    except HPRError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_eval_gen_parser(sub: Any) -> None:
    help_text = "the edit as a chat model: TruthfulQA answers generated through hpr-serve, scored (OUT/eval_gen.json)"
    p = sub.add_parser("eval-gen", help=help_text, description=help_text)
    p.add_argument("--out", type=Path, required=True, help="run directory: reads data.json, checkpoint/; writes here")
    p.add_argument("--model", default=EMBEDDED_MODEL_ID, help=f"base model [{EMBEDDED_MODEL_ID}]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [auto]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 [auto]")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads, here and in the server [all cores: the server generates, then it stops and the "
        "scoring here begins, so the two never compete]",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="serve and score chat-MC with int8 weights (hpr-serve --quantization); perplexity is still judged by "
        "the unquantized base model [none]",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="TruthfulQA directory [$HPR_TRUTHFULQA_DIR or ../shared]"
    )
    p.add_argument("--split", default="test", choices=("train", "eval", "test"), help="split to answer [test]")
    p.add_argument("--max-questions", type=int, default=None, help="only the first N questions of the split")
    p.add_argument(
        "--adapter",
        type=_named_path,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a checkpoint to serve and score; repeatable [OUT's name = OUT/checkpoint]",
    )
    p.add_argument(
        "--config",
        type=_config,
        action="append",
        default=[],
        metavar="[NAME=]ADAPTER[:layers=L][:alpha=A][:scope=S][:tokens=N]",
        help="an edit configuration; repeatable; unset fields take the adapter's defaults "
        "[each adapter at its defaults]. The base model is always evaluated.",
    )
    p.add_argument("--base-url", default=None, help="judge a running OpenAI-compatible server (…/v1) instead")
    p.add_argument("--api-key", default=os.environ.get("HPR_API_KEY"), help="its API key [$HPR_API_KEY]")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer [64]")
    p.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="requests in flight, and the server's batch [128: on 2 CPU cores a 128-row decode step gives 1.4x the "
        "tokens/s of a 32-row one]",
    )
    p.add_argument(
        "--chat-questions",
        type=Path,
        default=CHAT_QUESTIONS,
        help="everyday questions outside TruthfulQA for the fluency guard (.txt or .jsonl) [ours, 40]",
    )
    p.add_argument("--no-chat-questions", action="store_true", help="TruthfulQA only")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help=f"bootstrap resamples for the CIs [{DEFAULT_BOOTSTRAP}; with --rescore: the run's own]",
    )
    p.add_argument("--seed", type=int, default=None, help=f"bootstrap seed [{DEFAULT_SEED}; with --rescore: the run's]")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="judge the answers already stored in OUT again (non-answers, repeated 4-grams, degenerate) and rewrite "
        "its summary: no model, no server; for a run judged before those rules changed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")


def options_from_args(args: argparse.Namespace) -> EvalGenOptions:
    adapters = dict(args.adapter)
    if not adapters and (args.out / "checkpoint").is_dir():
        adapters = {args.out.resolve().name: args.out / "checkpoint"}
    return EvalGenOptions(
        out=args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        quantization=None if args.quantization == "none" else args.quantization,
        data_dir=args.data_dir,
        split=args.split,
        max_questions=args.max_questions,
        adapters=adapters,
        configs=list(args.config),
        base_url=args.base_url,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        chat_questions=None if args.no_chat_questions else args.chat_questions,
        bootstrap=DEFAULT_BOOTSTRAP if args.bootstrap is None else args.bootstrap,
        seed=DEFAULT_SEED if args.seed is None else args.seed,
        progress=not args.no_progress,
    )


def _fmt(entry: dict[str, Any], scale: float = 100.0) -> str:
    value = entry["value"] * scale
    if "delta" not in entry:
        return f"{value:6.1f}"
    lo, hi = (x * scale for x in entry["delta_ci95"])
    return f"{value:6.1f} ({entry['delta'] * scale:+.1f} [{lo:+.1f}, {hi:+.1f}])"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per configuration: truthfulness, chat-MC and fluency, deltas from the base with 95 % CIs."""
    lines = [f"split {report['split']}: {report['questions']} questions, {report['chat_questions']} chat questions"]
    for name, result in report["results"].items():
        t = result["truthfulqa"]
        f = t["fluency"]
        parts = [f"BLEU-acc {_fmt(t['bleu_acc'])}", f"ROUGE-L-acc {_fmt(t['rougeL_acc'])}"]
        if "chat_mc2" in t:
            parts.append(f"chat-MC2 {_fmt(t['chat_mc2'])}")
        ratio = f.get("perplexity_ratio", 1.0)
        parts.append(f"ppl {f['median_perplexity']:.2f} (x{ratio:.2f})" if math.isfinite(ratio) else "ppl n/a")
        parts.append(f"degen {f['degenerate']['value'] * 100:.1f}%  non-ans {f['non_answer']['value'] * 100:.1f}%")
        if name != BASE:
            parts.append("guard " + ("holds" if result["guard"]["holds"] else "FAILS"))
        lines.append(f"{name:>14}: " + "  ".join(parts))
    lines.append("rule: " + json.dumps(report["rule"], sort_keys=True))
    return lines


def run_eval_gen_cli(args: argparse.Namespace) -> int:
    from trainer.run_config import set_threads

    args.threads = set_threads(args.threads or os.cpu_count() or 1)
    start = time.perf_counter()
    if args.rescore:
        given = [flag for flag, value in RESCORE_IGNORES.items() if getattr(args, value)]
        if given:
            print(f"hpr-train eval-gen: error: --rescore judges stored answers; it takes no {', '.join(given)}",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        report = rescore(args.out, args.bootstrap, args.seed) if args.rescore else run_eval_gen(options_from_args(args))
    except (HPRError, ValueError) as exc:
        print(f"hpr-train eval-gen: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(report)))
    print(f"hpr-train eval-gen: done in {time.perf_counter() - start:.1f} s ({args.out / 'eval_gen.json'})")
    return 0
