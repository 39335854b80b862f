"""What each graph of the compiled decode step costs in memory and compile time (issue 11, ``--compile-decode``).

One in-process engine with the compiled step on the embedded SmolLM2 (fp32, ``--threads`` torch threads) and the
trained adapter (``runs/truthfulqa/checkpoint``). Requests that each need a graph not compiled before, in turn:
the adapter's default edit at 1 row, the same at 4 rows, no edit at 1 row, one layer of the adapter at 1 row,
and the default edit with edit statistics at 1 row. After each, the process's resident memory (VmRSS, after
``malloc_trim`` so freed memory is not counted) and the request's wall time (mostly the compile).

    python experiments/compiled_memory.py [--tokens 8] [--threads 1] [--max-graphs N]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from bench.compiled_decode import streams
from hpr.checkpoint import HPRAdapter
from hpr.editing import HPREditor
from hpr.model import EMBEDDED_MODEL_ID, load_model
from server.engine.engine import Engine

CHECKPOINT = Path(__file__).resolve().parents[1] / "runs" / "truthfulqa" / "checkpoint"


def rss_mib() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-graphs", type=int, default=None, help="the engine's compile_max_graphs [its default]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
    adapter = HPRAdapter.load(CHECKPOINT, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    editor = HPREditor(loaded.model, {"a": adapter})
    ids = list(loaded.tokenizer("Tell me about the history of Paris.")["input_ids"])
    extra = {} if args.max_graphs is None else {"compile_max_graphs": args.max_graphs}
    engine = Engine(loaded, editor.registry, max_batch_size=8, compile_decode=True, **extra)
    steps = [
        ("adapter default, 1 row", 1, editor.resolve("a", tokens="all"), False),
        ("adapter default, 4 rows", 4, editor.resolve("a", tokens="all"), False),
        ("no edit, 1 row", 1, None, False),
        ("adapter layer 16 only, 1 row", 1, editor.resolve("a", "16", tokens="all"), False),
        ("adapter default + stats, 1 row", 1, editor.resolve("a", tokens="all"), True),
    ]
    loop = asyncio.new_event_loop()
    engine.start()
    try:
        print(f"SmolLM2 fp32, {args.threads} thread(s); RSS after load: {rss_mib():.0f} MiB", flush=True)
        previous = rss_mib()
        for name, rows, edit, stats in steps:
            start = time.perf_counter()
            loop.run_until_complete(streams(engine, ids, rows, args.tokens, edit, stats))
            seconds = time.perf_counter() - start
            now = rss_mib()
            print(f"{name:>32}: {seconds:6.1f} s, RSS {now:.0f} MiB ({now - previous:+.0f})", flush=True)
            previous = now
    finally:
        loop.run_until_complete(engine.stop(drain_timeout=10))


if __name__ == "__main__":
    main()
