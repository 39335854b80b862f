"""Activation extraction speed: the seed's per-sample loop vs trainer.activations, same model, same questions.

    .venv/bin/python bench/extraction.py [--questions 6] [--format mc] [--threads 1]

The seed's loop, re-implemented faithfully: for every (positive, negative) pair of a question, build the chat
prompt + answer text, tokenize it, and run one forward pass over the whole sequence (batch 1, no KV cache),
once for the positive and once for the negative, keeping every decoder layer's output on the response tokens.
Ours: the split's common prefix once, each question's prompt once (KV cache), its answers batched on top.
A second baseline, "per-answer", runs each distinct answer once without a cache (a kinder reading of the seed).

Both produce the same activations (checked); the unit of work is the response-token activations the fit stage
consumes: Σ over kept pairs of (|positive| + |negative|). Printed: seconds, response tokens/s, speedup.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from hpr.decoder_layers import capture_layer_outputs
from hpr.model import load_model
from trainer.activations import ExtractOptions, Extractor, plan_question, store_settings
from trainer.data import default_data_dir, load_splits, load_truthfulqa, select
from trainer.prompts import EncodedQuestion, encode_all, prompt_text
from trainer.store import ActivationStore


def seed_loop(
    model: Any, tokenizer: Any, questions: list[Any], encoded: list[EncodedQuestion], fmt: str, per_pair: bool = True
) -> tuple[float, list[torch.Tensor]]:
    """The seed's shape: one full forward per sample; returns seconds and the activations of the first pair."""
    layers = range(model.config.num_hidden_layers)
    first: list[torch.Tensor] = []
    start = time.perf_counter()
    with torch.inference_mode(), capture_layer_outputs(model, layers) as captured:
        for question, enc in zip(questions, encoded, strict=True):
            plan = plan_question(enc, ExtractOptions())
            texts = [*question.correct, *question.incorrect]
            samples = [a for p in plan.pairs for a in p[:2]] if per_pair else plan.answers
            for answer in samples:
                prompt = prompt_text(tokenizer, question, fmt, 0)  # rebuilt per sample, as the seed does
                p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                a_ids = tokenizer(("" if fmt != "qa" else " ") + texts[answer], add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([p_ids + a_ids]))
                acts = torch.stack([captured[i][0, len(p_ids) :] for i in layers], dim=1).to(torch.float16)
                if not first or len(first) < 2:
                    first.append(acts)
    return time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=6, help="train questions to extract [6]")
    parser.add_argument("--format", default="mc", choices=("mc", "chat", "qa"), help="prompt format [mc, the seed's]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model [smollm2-135m-instruct]")
    parser.add_argument("--skip-per-answer", action="store_true", help="skip the per-answer baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = default_data_dir()
    if data_dir is None:
        raise SystemExit("TruthfulQA not found: set HPR_TRUTHFULQA_DIR")
    lm = load_model(args.model)
    all_q = load_truthfulqa(data_dir)
    questions = select(all_q, load_splits(data_dir / "ids_splits.json", len(all_q))["train"], args.questions)
    encoded = encode_all(lm.tokenizer, questions, args.format)
    plans = [plan_question(e, ExtractOptions()) for e in encoded]
    work = sum(
        len(e.answers[p]) + len(e.answers[n]) for e, pl in zip(encoded, plans, strict=True) for p, n, _, _ in pl.pairs
    )
    print(
        f"load avg {os.getloadavg()}, threads {args.threads}, {len(questions)} questions, format {args.format}, "
        f"{sum(len(p.pairs) for p in plans)} pairs, {work} response-token activations"
    )

    tmp = tempfile.mkdtemp(prefix="bench-extract-")
    try:
        opts = ExtractOptions(store_dtype="float16")
        store = ActivationStore(tmp)
        start = time.perf_counter()
        Extractor(lm.model, opts).run(encoded, store, store_settings(args.model, opts, {}), progress=False)
        ours = time.perf_counter() - start
        shard = store.load_shard(store.shards[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seed_s, seed_first = seed_loop(lm.model, lm.tokenizer, questions, encoded, args.format)
    # the first stored answer of ours is the first pair's positive: same numbers as the seed's first sample
    mine = shard["activations"][shard["answer_offsets"][0] : shard["answer_offsets"][1]]
    err = float((mine.float() - seed_first[0].float()).abs().max())
    rows = [("seed loop (per pair sample)", seed_s)]
    if not args.skip_per_answer:
        rows.append(
            ("per-answer, no cache", seed_loop(lm.model, lm.tokenizer, questions, encoded, args.format, False)[0])
        )
    rows.append(("ours (shared prefix + batched)", ours))
    for name, seconds in rows:
        print(f"{name:32s} {seconds:8.1f} s  {work / seconds:9.1f} response tok/s  speedup {seed_s / seconds:5.1f}×")
    print(f"max |ours - seed| on the first answer: {err:.2e} (fp16 storage)")
    print(f"load avg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
