"""Contrastive pairs from the model's own chat answers: an experiment for issue 7 (docs/quality.md).

The `qa`, `chat` and `mc` checkpoints learn from TruthfulQA's reference answers, text the model would not write.
This samples the base model's own answers to a split's questions (chat template, ``--n`` samples at
``--temperature``, through ``hpr-serve`` over HTTP), labels each by lm-eval's ``truthfulqa_gen`` rule against the
question's references (true when BLEU *and* ROUGE-L are closer to a correct reference than to every incorrect one,
false when both are closer to an incorrect one, unused when they disagree), drops non-answers and answers with
≥ 25 % repeated 4-grams from both sides, and writes up to ``--pairs-per-question`` (true, false) pairs per question
as the JSONL that ``hpr-train run --pairs-file`` reads. Every labelled answer goes to ``OUT.answers.jsonl``.

    python experiments/self_pairs.py --split train --n 8 --out runs/self/pairs.jsonl
    hpr-train run --pairs-file runs/self/pairs.jsonl --format chat --split-ratios 0.9,0.1,0 --out runs/self \
        --skip-eval

Only train questions are sampled (the default), so the eval and test splits stay untouched.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

from hpr.model import EMBEDDED_MODEL_ID
from trainer import data as D
from trainer import gen_metrics as M
from trainer.gen_client import LocalServer, list_models


def sample(
    client: OpenAI, model: str, question: str, n: int, temperature: float, max_tokens: int, seed: int
) -> list[str]:
    """``n`` chat answers to ``question`` (the SDK retries the server's 429s)."""
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=temperature,
        n=n,
        seed=seed,
    )
    return [choice.message.content or "" for choice in response.choices]


def label(text: str, true_refs: list[str], false_refs: list[str]) -> tuple[str, M.Truthfulness]:
    t = M.truthfulness(text, true_refs, false_refs)
    if M.is_non_answer(text) or M.repeated_4gram_share(text) >= M.REP4_DEGENERATE:
        return "unused", t
    if t.bleu_acc and t.rougeL_acc:
        return "true", t
    if not t.bleu_acc and not t.rougeL_acc:
        return "false", t
    return "unused", t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="pairs JSONL to write")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--n", type=int, default=8, help="samples per question [8]")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pairs-per-question", type=int, default=4)
    p.add_argument("--include-greedy", action="store_true", help="also label the greedy answer")
    p.add_argument("--concurrency", type=int, default=16, help="questions in flight (each with n samples) [16]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    data_dir = args.data_dir or D.default_data_dir()
    if data_dir is None:
        sys.exit("no TruthfulQA: pass --data-dir")
    questions = D.load_truthfulqa(data_dir)
    ids = D.load_splits(Path(data_dir) / D.SPLITS_FILE, len(questions))
    chosen = D.select(questions, ids[args.split], args.max_questions)
    refs = D.generation_references(data_dir, chosen)

    started = time.monotonic()
    with LocalServer(EMBEDDED_MODEL_ID, {}, threads=args.threads, max_batch_size=128) as srv:
        model = next(m["id"] for m in list_models(srv.base_url) if not m.get("parent"))
        client = OpenAI(base_url=srv.base_url, api_key="unused", max_retries=60, timeout=600)

        def one(q: D.Question) -> list[str]:
            texts = sample(client, model, q.question, args.n, args.temperature, args.max_tokens, args.seed + q.index)
            if args.include_greedy:
                texts += sample(client, model, q.question, 1, 0.0, args.max_tokens, 0)
            return texts

        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(one, chosen))
    gen_s = time.monotonic() - started

    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    pairs: list[dict[str, str]] = []
    with_pairs = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with Path(str(args.out) + ".answers.jsonl").open("w") as log:
        for q, texts in zip(chosen, answers, strict=True):
            true_refs, false_refs = M.references(*refs[q.index])
            by: dict[str, list[str]] = {"true": [], "false": [], "unused": []}
            for text in dict.fromkeys(t.strip() for t in texts):
                kind, t = label(text, true_refs, false_refs)
                counts[kind] += 1
                by[kind].append(text)
                log.write(
                    json.dumps(
                        {
                            "index": q.index,
                            "question": q.question,
                            "label": kind,
                            "answer": text,
                            "bleu_diff": t.bleu_diff,
                            "rougeL_diff": t.rougeL_diff,
                        }
                    )
                    + "\n"
                )
            combos = [(a, b) for a in by["true"] for b in by["false"]]
            rng.shuffle(combos)
            if combos:
                with_pairs += 1
            for a, b in combos[: args.pairs_per_question]:
                pairs.append({"question": q.question, "positive": a, "negative": b})
    args.out.write_text("".join(json.dumps(x) + "\n" for x in pairs))
    print(
        f"{len(chosen)} questions, {sum(counts.values())} distinct answers in {gen_s:.0f} s: "
        f"{counts['true']} true, {counts['false']} false, {counts['unused']} unused; "
        f"{len(pairs)} pairs from {with_pairs} questions -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
