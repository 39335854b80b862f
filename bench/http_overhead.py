"""What the HTTP layer costs: the same load through ``Engine.generate`` in-process and through hpr-serve's HTTP API.

Both sides use one engine (one model load) inside this process: the app runs with uvicorn in a thread, and the
in-process side submits to the same engine from a second event loop. The HTTP clients (bench/load_generator.py)
run in a subprocess, so they do not share this process's GIL. Runs are interleaved (A, B, A, B, ...) and the
best of each is kept, since the machine is shared. Prints output tok/s per side and their ratio.

    .venv/bin/python bench/http_overhead.py [--model smollm2-135m-instruct] [--concurrency 16] [--max-tokens 32] \
        [--num-threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_generator

from server.engine.types import GenerationRequest, SamplingParams
from server.settings import ServerSettings
from tests.server.live_server import run_server


async def in_process(engine: object, prompt_ids: list[int], concurrency: int, requests: int, max_tokens: int) -> float:
    """Output tok/s with ``concurrency`` workers pulling ``requests`` requests through ``engine.generate``."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    counter = iter(range(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in counter:
            async for out in engine.generate(GenerationRequest(f"direct-{time.time()}-{i}", prompt_ids, sampling)):  # type: ignore[attr-defined]
                tokens += len(out.token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="Per run (default: 2 × concurrency).")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (hpr-serve --num-threads).")
    args = p.parse_args()
    requests = args.requests or 2 * args.concurrency
    settings = ServerSettings(
        model=args.model,
        max_batch_size=max(32, args.concurrency),
        device="cpu",
        dtype="float32",
        num_threads=args.num_threads,
    )
    with run_server(settings) as live:
        runtime = live.app.state.runtime
        prompt = load_generator.make_prompt(args.prompt_tokens)
        prompt_ids = list(runtime.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        out = Path(tempfile.mkdtemp()) / "http.json"
        command = [sys.executable, str(Path(__file__).resolve().parent / "load_generator.py"),
                   "--base-url", live.api_base, "--model", runtime.base_id, "--endpoint", "completions",
                   "--concurrency", str(args.concurrency), "--requests", str(requests),
                   "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens), "--warmup", "1",
                   "--json", str(out)]  # fmt: skip
        direct: list[float] = []
        http: list[float] = []
        for _ in range(args.repeats):
            direct.append(
                asyncio.run(in_process(runtime.engine, prompt_ids, args.concurrency, requests, args.max_tokens))
            )
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            summary = json.loads(out.read_text())
            assert summary["failed"] == 0, summary["errors"]
            http.append(summary["output_tok_per_s"])
    print(f"model {runtime.base_id}, {args.concurrency} concurrent, {requests} requests × {args.max_tokens} tokens, "
          f"prompt ≈ {len(prompt_ids)} tokens; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"  in-process Engine.generate  {max(direct):8.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in direct)})")
    print(f"  HTTP (SSE, hpr-serve)       {max(http):8.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in http)})")
    print(f"  HTTP / in-process           {max(http) / max(direct):8.3f} (best runs)  "
          f"{statistics.median(http) / statistics.median(direct):.3f} (medians)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
