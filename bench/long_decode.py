"""Long streams, no arrivals: does anything pause every running stream while they decode? Inter-token latency of N
greedy streams of T tokens each in the in-process engine, its tail and its longest gap, and the peak RSS.

Growing the KV cache (a copy of every used column into a bigger buffer) is such a pause; this is the benchmark of
the change that allocates a CPU cache for its rows' budgets at once (docs/benchmarks.md, "Decoding without growth").
Each run is a fresh process (one model load, one round of N streams after a short warm-up round), so its peak RSS is
its own. ``--against DIR`` runs the same measurement with another checkout's code (e.g. a ``git worktree`` of an
older commit, where this script is copied) in ABBA order by process: the side-by-side A/B.

    .venv/bin/python bench/long_decode.py [--streams 32] [--tokens 600] [--threads 2] [--runs 2] [--against DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo (and with the code of the tree it lies in)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One round of ``args.streams`` streams in this process: figures of the gaps between tokens (the first token,
    the prefill, excluded)."""
    from hpr.editing import HPREditor
    from hpr.model import EMBEDDED_MODEL_ID, load_model
    from server.allocator import keep_freed_memory
    from server.engine.engine import Engine
    from server.engine.types import GenerationRequest, SamplingParams

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
    engine = Engine(loaded, HPREditor(loaded.model, {}).registry, max_batch_size=args.streams)

    async def one_round(name: str, tokens: int) -> list[list[float]]:
        stamps: list[list[float]] = [[] for _ in range(args.streams)]

        async def stream(i: int) -> None:
            prompt = list(engine.tokenizer.encode(f"Story number {i}: once upon a time"))
            sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            async for out in engine.generate(GenerationRequest(f"{name}-{i}", prompt, sampling)):
                stamps[i].extend([time.perf_counter()] * max(1, len(out.token_ids)))

        await asyncio.gather(*(stream(i) for i in range(args.streams)))
        return stamps

    async def run() -> list[list[float]]:
        engine.start()
        try:
            await one_round("warm", 8)
            return await one_round("run", args.tokens)
        finally:
            await engine.stop()

    stamps = asyncio.run(run())
    gaps = [b - a for s in stamps for a, b in itertools.pairwise(s[1:])]
    p50 = float(np.percentile(gaps, 50, method="nearest"))
    decode = max(s[-1] for s in stamps) - min(s[1] for s in stamps)
    return {
        "tok_s": sum(len(s) - 1 for s in stamps) / decode,
        "itl_p50_ms": p50 * 1e3,
        "itl_p99_ms": float(np.percentile(gaps, 99, method="nearest")) * 1e3,
        "itl_max_ms": max(gaps) * 1e3,
        "steps_over_4x_p50": sum(1 for a, b in itertools.pairwise(stamps[0][1:]) if b - a > 4 * p50),  # one stream
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=600, help="tokens per stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="processes per side (ABBA order with --against)")
    parser.add_argument("--against", type=Path, default=None, help="another checkout to compare with, side by side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return
    sides = {"this": ROOT} | ({"against": args.against.resolve()} if args.against else {})
    names = list(sides)
    order = [n for i in range(args.runs) for n in (names if i % 2 == 0 else names[::-1])]
    print(f"{args.streams} streams × {args.tokens} tokens, {args.threads} threads, order {order}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for name in order:
        script = sides[name] / "bench" / Path(__file__).name
        child = [sys.executable, str(script), "--child", "--streams", str(args.streams), "--tokens", str(args.tokens)]
        out = subprocess.run([*child, "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        results[name].append(figures)
        print(f"  {name}: " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    print("side | runs | tok/s | ITL p50 / p99 / max (ms) | steps > 4× p50 | peak RSS (GB)   (medians)")
    for name in names:
        runs = results[name]

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(
            f"{name} ({sides[name]}) | {len(runs)} | {med('tok_s'):.1f} | {med('itl_p50_ms'):.0f} / "
            f"{med('itl_p99_ms'):.0f} / {med('itl_max_ms'):.0f} | {med('steps_over_4x_p50'):.0f} | "
            f"{med('peak_rss_gb'):.2f}"
        )
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
