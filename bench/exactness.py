"""Batched vs alone on SmolLM2 with a trained adapter: how often a request's greedy output differs. Prints figures.

    .venv/bin/python bench/exactness.py [--adapter runs/truthfulqa/checkpoint] [--prompts 100] [--max-tokens 24]
        [--alphas 2,4] [--batch 32] [--threads 1] [--json out.json] [--compile-decode]

For each configuration (no edit, then the adapter's selected layers and default scope at each alpha), the same
``--prompts`` chat prompts (TruthfulQA questions, chat template applied) are generated greedily twice through the
real engine (``server.engine.Engine``):

- batched: all submitted at once to an engine with ``max_batch_size=--batch``, so rows are prefilled in groups
  (left-padded) and decode together, joining and leaving the running batch as in serving;
- alone: one at a time through an engine with ``max_batch_size=1``.

With ``--compile-decode`` the batched engine decodes through the compiled step (``Engine(compile_decode=True)``)
and the alone one stays eager: the compiled path against the eager one.

Per configuration it prints: the share of requests whose greedy tokens differ; the largest logprob difference
over the steps where both runs had the same context (tokens up to there equal), taken over the chosen token and
the top-5 alternatives both runs report; the same largest difference over the requests whose tokens agree; and
the share of requests whose per-layer count of rotated positions (``return_stats``) differs — a probe decision
that flipped. The no-edit row is the floor: how far the base model's own batched and single forwards differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpr.checkpoint import HPRAdapter  # noqa: E402
from hpr.editing import EditSpec, HPREditor  # noqa: E402
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from server.engine.types import GenerationRequest, SamplingParams  # noqa: E402

ADAPTER = "trained"
TOP = 5  # logprob alternatives compared per step


@dataclass
class Result:
    tokens: list[int]
    steps: list[dict[int, float]]  # per generated token: token id -> logprob (the chosen one and the top-5)
    rotated: dict[int, int]  # layer -> positions rotated


class BatchSizes:
    """Engine observer: the rows of every decode step (proof that requests shared forward passes)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, batch_size: int) -> None:
        self.sizes.append(batch_size)

    def on_first_token(self, request_id: str, seconds: float) -> None:
        pass

    def on_token(self, request_id: str, seconds_since_last: float) -> None:
        pass

    def on_finish(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def on_edit(self, layer: int, tokens: int) -> None:
        pass


def questions(n: int) -> list[str]:
    data_dir = Path(os.environ.get("HPR_TRUTHFULQA_DIR", REPO.parent / "shared" / "data" / "truthfulqa"))
    items = json.loads((data_dir / "mc_task.json").read_text())
    found = [str(item["question"]) for item in items[:n]]
    if len(found) < n:
        raise SystemExit(f"only {len(found)} questions in {data_dir}")
    return found


def chat_prompts(loaded: LoadedModel, texts: list[str]) -> list[list[int]]:
    out = []
    for text in texts:
        enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(list(enc["input_ids"]))
    return out


def request(i: int, prompt: list[int], edit: EditSpec | None, max_tokens: int) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP)
    return GenerationRequest(f"r{i}", prompt, sampling, edit=edit, return_stats=edit is not None)


async def generate(engine: Engine, req: GenerationRequest) -> Result:
    tokens: list[int] = []
    steps: list[dict[int, float]] = []
    rotated: dict[int, int] = {}
    async for out in engine.generate(req):
        tokens += out.token_ids
        for lp in out.logprobs or []:
            step = {token_id: value for token_id, _text, value in lp.top}
            step[lp.token_id] = lp.logprob
            steps.append(step)
        if out.edit_stats:
            rotated = {layer: s.changed for layer, s in out.edit_stats.layers.items()}
    return Result(tokens, steps, rotated)


async def run_batched(
    loaded: LoadedModel, editor: HPREditor, prompts: list[list[int]], edit: EditSpec | None, args: Any
) -> tuple[list[Result], list[int]]:
    observer = BatchSizes()
    engine = Engine(
        loaded,
        editor.registry,
        max_batch_size=args.batch,
        max_queue=len(prompts),
        observer=observer,
        compile_decode=args.compile_decode,
    )
    engine.start()
    try:
        results = await asyncio.gather(
            *(generate(engine, request(i, p, edit, args.max_tokens)) for i, p in enumerate(prompts))
        )
    finally:
        await engine.stop()
    return list(results), observer.sizes


async def run_alone(
    loaded: LoadedModel, editor: HPREditor, prompts: list[list[int]], edit: EditSpec | None, args: Any
) -> list[Result]:
    engine = Engine(loaded, editor.registry, max_batch_size=1, max_queue=1)
    engine.start()
    try:
        return [await generate(engine, request(i, p, edit, args.max_tokens)) for i, p in enumerate(prompts)]
    finally:
        await engine.stop()


def compare(batched: list[Result], alone: list[Result]) -> dict[str, Any]:
    differ = 0
    flipped = 0
    max_lp = 0.0
    max_lp_same = 0.0
    first_divergence: list[int] = []
    for b, a in zip(batched, alone, strict=True):
        same = b.tokens == a.tokens
        differ += not same
        flipped += b.rotated != a.rotated
        worst = 0.0
        for step, (sb, sa) in enumerate(zip(b.steps, a.steps, strict=True)):
            common = sb.keys() & sa.keys()
            if common:
                worst = max(worst, max(abs(sb[t] - sa[t]) for t in common))
            if b.tokens[step] != a.tokens[step]:  # later steps have different contexts: not comparable
                first_divergence.append(step)
                break
        max_lp = max(max_lp, worst)
        if same:
            max_lp_same = max(max_lp_same, worst)
    n = len(batched)
    return {
        "requests": n,
        "differ": differ,
        "share_differ": differ / n,
        "probe_counts_differ": flipped,
        "max_logprob_diff": max_lp,
        "max_logprob_diff_same_tokens": max_lp_same,
        "first_divergence_steps": first_divergence,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL_ID)
    parser.add_argument("--adapter", default=str(REPO / "runs" / "truthfulqa" / "checkpoint"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--alphas", default="2,4", help="comma list; the no-edit floor is always measured")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched engine")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="the batched engine decodes through the compiled step; the alone one stays eager",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    adapter = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    editor = HPREditor(loaded.model, {ADAPTER: adapter})
    prompts = chat_prompts(loaded, questions(args.prompts))
    cfg = adapter.config
    print(
        f"# {loaded.model_id} {loaded.dtype}, torch threads {torch.get_num_threads()}; adapter {args.adapter}: "
        f"layers {cfg.selected_layers}, default alpha {cfg.default_alpha}, default scope {cfg.default_scope}"
    )
    print(
        f"# {len(prompts)} prompts (TruthfulQA questions, chat template, {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens), {args.max_tokens} greedy tokens each; batched (max batch {args.batch}) "
        f"vs alone (max batch 1)"
    )
    print(f"# load average at start: {os.getloadavg()}")
    configs: list[tuple[str, EditSpec | None]] = [("no edit", None)]
    alphas = [float(a) for a in args.alphas.split(",")]
    # every generated token edited (not the checkpoint's edit_tokens default): exactness is about the edited steps
    configs += [(f"alpha {a:g}", editor.resolve(ADAPTER, alpha=a, tokens="all")) for a in alphas]
    report: list[dict[str, Any]] = []
    for label, edit in configs:
        started = time.perf_counter()
        batched, sizes = asyncio.run(run_batched(loaded, editor, prompts, edit, args))
        alone = asyncio.run(run_alone(loaded, editor, prompts, edit, args))
        row = compare(batched, alone)
        row.update(label=label, max_decode_batch=max(sizes), mean_decode_batch=sum(sizes) / len(sizes))
        row.update(seconds=time.perf_counter() - started, load=os.getloadavg()[0])
        report.append(row)
        print(
            f"{label:<8}  tokens differ in {row['differ']:>3}/{row['requests']} requests "
            f"({100 * row['share_differ']:5.1f} %)   max |Δ logprob| {row['max_logprob_diff']:.2e} "
            f"(requests with equal tokens: {row['max_logprob_diff_same_tokens']:.2e})   "
            f"rotated counts differ in {row['probe_counts_differ']:>3}   "
            f"decode batch mean {row['mean_decode_batch']:.1f} max {row['max_decode_batch']}   "
            f"({row['seconds']:.0f} s, load {row['load']:.2f})",
            flush=True,
        )
    editor.detach()
    print(f"# load average at end: {os.getloadavg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
