"""The compiled decode step against the eager one, side by side in one run (issue 11 item 1).

Two engines on the same SmolLM2 (fp32, ``--threads`` torch threads, default 1) and the same adapter
(``--adapter``, default ``runs/truthfulqa/checkpoint``, at its default edit): ``eager`` and ``compiled``
(``Engine(compile_decode=True)``, the server's ``--compile-decode``). For each batch size in ``--batch``
(default 1 and 32): that many concurrent greedy requests of ``--tokens`` new tokens (``ignore_eos``), rounds in
ABBA order, medians reported. Decode tok/s = tokens after each request's first, summed over requests ÷ (the last
token's time − the first token's time), so prefill is left out. The warm-up round (where the compiled engine
compiles each shape) is timed and reported apart, as the compile cost.

The figure the default is judged by, chosen before measuring: batch-1 decode tok/s compiled ÷ eager, with the
adapter's default edit. The 32-stream ratio is reported next to it.

    .venv/bin/python bench/compiled_decode.py [--batch 1,32] [--tokens 64] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from hpr.checkpoint import HPRAdapter
from hpr.editing import EditSpec, HPREditor
from hpr.model import EMBEDDED_MODEL_ID, load_model
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


async def streams(
    engine: Engine, ids: list[int], batch: int, n: int, edit: EditSpec | None, stats: bool = False
) -> float:
    """Aggregate decode tok/s of ``batch`` concurrent requests (``stats``: each asks for edit statistics)."""
    sampling = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    first: list[float] = []
    last: list[float] = []
    tag = time.time()

    async def one(i: int) -> None:
        stamps: list[float] = []
        request = GenerationRequest(f"{tag}-{i}", ids, sampling, edit=edit, return_stats=stats)
        async for out in engine.generate(request):
            stamps.extend([time.perf_counter()] * len(out.token_ids))
        first.append(stamps[0])
        last.append(stamps[-1])

    await asyncio.gather(*(one(i) for i in range(batch)))
    return batch * (n - 1) / (max(last) - min(first))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,32", help="comma list of concurrent requests [1,32]")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA cycles")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapter", type=Path, default=Path("runs/truthfulqa/checkpoint"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
    ids = list(loaded.tokenizer(PROMPT)["input_ids"])
    adapters = {}
    if args.adapter.exists():
        adapters["a"] = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    editor = HPREditor(loaded.model, adapters)
    edit = editor.resolve("a", tokens="all") if adapters else None  # every token edited, as the recorded figures
    batches = [int(b) for b in args.batch.split(",")]
    engines = {
        "eager": Engine(loaded, editor.registry, max_batch_size=max(batches)),
        "compiled": Engine(loaded, editor.registry, max_batch_size=max(batches), compile_decode=True),
    }
    print(
        f"SmolLM2 fp32, {args.threads} thread(s), {args.tokens} tokens, edit {edit}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    loop = asyncio.new_event_loop()
    for engine in engines.values():
        engine.start()
    results: dict[tuple[str, int], list[float]] = {(name, b): [] for b in batches for name in engines}
    try:
        for batch in batches:
            for name, engine in engines.items():  # warm-up: the compiled engine compiles this shape here
                start = time.perf_counter()
                loop.run_until_complete(streams(engine, ids, batch, args.tokens, edit))
                print(f"warm-up {name} batch {batch}: {time.perf_counter() - start:.1f} s", flush=True)
            names = list(engines)
            for _ in range(args.rounds):
                for name in names + names[::-1]:
                    rate = loop.run_until_complete(streams(engines[name], ids, batch, args.tokens, edit))
                    results[(name, batch)].append(rate)
    finally:
        for engine in engines.values():
            loop.run_until_complete(engine.stop(drain_timeout=10))
    print("batch | eager tok/s (median; runs) | compiled tok/s (median; runs) | compiled ÷ eager")
    for batch in batches:
        eager, compiled = results[("eager", batch)], results[("compiled", batch)]
        e, c = statistics.median(eager), statistics.median(compiled)
        print(
            f"{batch} | {e:.1f}; {', '.join(f'{v:.1f}' for v in eager)} | "
            f"{c:.1f}; {', '.join(f'{v:.1f}' for v in compiled)} | {c / e:.2f}×"
        )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"peak RSS at the end {peak_rss_mb():.0f} MB (the compiled graphs hold their own packed weights)")
    print(f"graphs compiled: {graphs}; load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
