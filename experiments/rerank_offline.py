"""Can the edit choose among answers where it cannot write them? An offline test on the cross-validation folds.

In scoring mode the HPR edit prefers true answers (MC2 +24 points on eval, against +10 for a random edit of the same
size), while its generated answers are no truer than a random edit's. This script asks whether that scoring-mode
preference can pick the truer of the model's *own* answers: for every train question of
``experiments/crossval_gen.py``'s folds, the candidates are the distinct answers already generated there (the base's and
the sweep's configurations), each with its stored BLEU-acc / ROUGE-L-acc judgement. Each candidate is scored in the chat
template by the fold's adapter (trained without the question) at the scoring-mode optimum (alpha 2, every position and
token) and by the unedited base model, and one is picked per question.

Chosen before looking (2026-12-03):
- primary pick ``ratio``: the highest sum over the answer's tokens of log p_edited − log p_base;
- also ``edited``: the highest sum of log p_edited (MC1's rule); ``null``: ``ratio`` with the fold's random-probe
  copy (``--null-sweep``'s ``checkpoint-random``) in place of the trained adapter;
- judged by the mean of BLEU-acc and ROUGE-L-acc against the base's greedy answer (paired bootstrap 95 % CI), each
  reported too, with the picked answers' median perplexity and degenerate share (stored judgements), the share of
  questions whose pick is not the base's answer, the oracle (some candidate true) and a uniform pick's expectation.

    .venv/bin/python experiments/rerank_offline.py [--runs runs/crossval] [--sweep s1] [--null-sweep null1]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import numpy as np
import torch

from hpr.checkpoint import HPRAdapter
from hpr.editing import HPREditor
from hpr.model import load_model
from trainer.eval_gen import chat_prompt_ids
from trainer.evaluate import PassContexts, answer_logprobs, edit_context, paired_bootstrap_ci
from trainer.prefix_cache import PrefixRunner

BASE = "base"


def candidates(fold: Path, sweep: str) -> list[dict[str, Any]]:
    """Per question of the fold: its text, and its distinct answers (base first) with their stored judgements."""
    rows = [json.loads(line) for line in (fold / sweep / "answers.jsonl").read_text().splitlines() if line]
    out = []
    for row in rows:
        if row.get("set", "truthfulqa") != "truthfulqa":
            continue
        answers = row["answers"]
        names = [BASE, *sorted(n for n in answers if n != BASE)]
        seen: dict[str, dict[str, Any]] = {}
        for name in names:
            seen.setdefault(answers[name]["text"], answers[name])
        out.append({"index": row["index"], "question": row["question"], "answers": list(seen.values())})
    return out


@torch.inference_mode()
def loglik(lm: Any, contexts: PassContexts, questions: list[dict[str, Any]], batch_tokens: int) -> list[list[float]]:
    """Sum of token log-probabilities of each candidate, as the assistant turn after its question."""
    prompt_runner = PrefixRunner(lm.model, context=contexts.prompt)
    answer_runner = PrefixRunner(lm.model, context=contexts.answers)
    out = []
    for q in questions:
        prompt = chat_prompt_ids(lm.tokenizer, q["question"])
        rows = [list(lm.tokenizer(a["text"], add_special_tokens=False)["input_ids"]) for a in q["answers"]]
        logps = answer_logprobs(prompt_runner, answer_runner, None, prompt, rows, batch_tokens)
        out.append([float(sum(lp)) for lp in logps])
    return out


def edited_scores(lm: Any, checkpoint: Path, questions: list[dict[str, Any]], batch_tokens: int) -> list[list[float]]:
    adapter = HPRAdapter.load(checkpoint, name="fold", hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    editor = HPREditor(lm.model, {"fold": adapter})
    try:
        ctx = edit_context(editor, "fold", adapter.config.selected_layers, 2.0, "all", "all")
        return loglik(lm, ctx, questions, batch_tokens)
    finally:
        editor.detach()


def pick(scores: list[float]) -> int:
    return int(np.argmax(scores))


def report(name: str, questions: list[dict[str, Any]], picks: list[int], samples: int) -> dict[str, Any]:
    def col(key: str, chosen: list[int]) -> list[float]:
        return [float(q["answers"][i][key]) for q, i in zip(questions, chosen, strict=True)]

    base = [0] * len(questions)
    row: dict[str, Any] = {"pick": name}
    for key in ("bleu_acc", "rougeL_acc"):
        b, p = col(key, base), col(key, picks)
        lo, hi = paired_bootstrap_ci(b, p, samples)
        row[key] = {"base": 100 * np.mean(b), "delta": 100 * (np.mean(p) - np.mean(b)), "ci": [100 * lo, 100 * hi]}
    b = [(x + y) / 2 for x, y in zip(col("bleu_acc", base), col("rougeL_acc", base), strict=True)]
    p = [(x + y) / 2 for x, y in zip(col("bleu_acc", picks), col("rougeL_acc", picks), strict=True)]
    lo, hi = paired_bootstrap_ci(b, p, samples)
    row["truth"] = {"delta": 100 * (np.mean(p) - np.mean(b)), "ci": [100 * lo, 100 * hi]}
    ppl = [x for x in col("perplexity", picks) if np.isfinite(x)]
    base_ppl = [x for x in col("perplexity", base) if np.isfinite(x)]
    row["ppl_ratio"] = float(np.median(ppl) / np.median(base_ppl))
    row["degenerate"] = 100 * float(np.mean(col("degenerate", picks)))
    row["changed"] = 100 * float(np.mean([i != 0 for i in picks]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/crossval"))
    ap.add_argument("--sweep", default="s1", help="the sweep whose answers are the candidates")
    ap.add_argument("--null-sweep", default="null1", help="the sweep holding each fold's checkpoint-random")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--bootstrap", type=int, default=10000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(device="cpu", dtype="float32")
    folds = sorted(p for p in args.runs.glob("fold*") if (p / args.sweep / "answers.jsonl").exists())
    if not folds:
        sys.exit(f"no {args.runs}/fold*/{args.sweep}/answers.jsonl")
    questions: list[dict[str, Any]] = []
    scores: dict[str, list[list[float]]] = {"base": [], "edited": [], "null": []}
    for fold in folds:
        qs = candidates(fold, args.sweep)
        questions += qs
        scores["base"] += loglik(lm, PassContexts(), qs, args.batch_tokens)
        scores["edited"] += edited_scores(lm, fold / "checkpoint", qs, args.batch_tokens)
        scores["null"] += edited_scores(lm, fold / args.null_sweep / "checkpoint-random", qs, args.batch_tokens)
        print(f"{fold.name}: {len(qs)} questions scored ({time.perf_counter() - t0:.0f} s)", flush=True)

    def ratio(kind: str) -> list[int]:
        return [pick(list(np.subtract(e, b))) for e, b in zip(scores[kind], scores["base"], strict=True)]

    picks = {
        "ratio": ratio("edited"),
        "edited": [pick(e) for e in scores["edited"]],
        "null": ratio("null"),
        "base loglik": [pick(b) for b in scores["base"]],
    }
    rows = [report(name, questions, p, args.bootstrap) for name, p in picks.items()]
    n_cand = [len(q["answers"]) for q in questions]
    truth = [[(a["bleu_acc"] + a["rougeL_acc"]) / 2 for a in q["answers"]] for q in questions]
    base_truth = float(np.mean([t[0] for t in truth]))
    oracle = float(np.mean([max(t) for t in truth]))
    uniform = float(np.mean([np.mean(t) for t in truth]))
    rng = random.Random(0)
    rows.append(report("uniform (one draw)", questions, [rng.randrange(n) for n in n_cand], args.bootstrap))
    print(f"\n{len(questions)} questions, candidates per question: mean {np.mean(n_cand):.1f}, max {max(n_cand)}")
    print(
        f"mean truth (BLEU-acc + ROUGE-L-acc)/2: base {100 * base_truth:.1f}, uniform pick {100 * uniform:.1f}, "
        f"oracle {100 * oracle:.1f}\n"
    )
    print("| pick | Δ truth | Δ BLEU-acc | Δ ROUGE-L-acc | ppl × base | degenerate % | not the base's answer % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def f(d: dict[str, Any]) -> str:
        return f"{d['delta']:+.1f} ({d['ci'][0]:+.1f} … {d['ci'][1]:+.1f})"

    for r in rows:
        print(
            f"| {r['pick']} | {f(r['truth'])} | {f(r['bleu_acc'])} | {f(r['rougeL_acc'])} | {r['ppl_ratio']:.2f} | "
            f"{r['degenerate']:.1f} | {r['changed']:.0f} |"
        )
    base_deg = 100 * float(np.mean([q["answers"][0]["degenerate"] for q in questions]))
    print(f"\nbase degenerate {base_deg:.1f} %; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
