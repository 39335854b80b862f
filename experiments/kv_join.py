"""What a batch change costs the running streams: the KV cache join and filter, with glibc's allocator tuned or not.

When newcomers join a running batch, ``BatchKVCache.concatenate`` builds one cache for all rows, and when a row
leaves, ``select`` builds another; every running stream waits for both. Per side, a fresh process builds a running
cache of ``--rows`` × ``--length`` columns (SmolLM2's 30 layers, 3 KV heads of 64, fp32), then ``--reps`` times joins
1-3 newcomers of ``--new-length`` columns and filters them out again, on a thread of its own (as the engine thread
does: glibc gives each thread its own arena). Sides: ``tuned`` (``server.allocator.keep_freed_memory``, hpr-serve's
default) and ``defaults`` (``--no-malloc-tuning``), in ABBA order; ``MALLOC_*`` variables are removed from the
children's environment. Prints per side the median and max of join + filter (ms) over the repetitions after the
first (the first pays for the process's first touch of that much memory either way), and the first.

    .venv/bin/python experiments/kv_join.py [--rounds 2] [--threads 2] [--reps 8]

``--churn``: the steady state of a busy server instead, one row finishing and one newcomer joining per cycle, in one
process with hpr-serve's allocator settings, ABBA by cycle: ``copy`` (the kept rows copied into a new cache, then
the newcomer joined by a second copy: ``select`` + ``concatenate``, the engine's path before 2026-12-03) against
``in place`` (the last row moved into the leaver's place, the newcomer written into the spare row: ``compact`` +
``join_in_place``). Each side keeps its own cache across cycles. Prints the median and max per cycle (ms).

``--churn --arrive``: a newcomer longer than the running rows joins a batch nobody has left, then leaves again
(``--new-length`` > ``--length``). ``copy``: ``concatenate`` then ``select`` (dropping the padding again); ``in place``:
``join_in_place`` takes a spare row and head columns (the running rows' padding grows), then ``compact`` and
``drop_left`` give them back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def make_cache(batch: int, columns: int) -> Any:
    """A ``BatchKVCache`` of ``batch`` rows of ``columns`` random columns (torch imported by the caller first)."""
    import torch

    from server.engine.kv_cache import BatchKVCache

    cache = BatchKVCache(LAYERS)
    for layer in cache.growable_layers:
        keys = torch.randn(batch, KV_HEADS, columns, HEAD_DIM)  # (B, H_kv, T, D)
        layer.update(keys, keys.clone())
    return cache


def child(tuned: bool, threads: int, rows: int, length: int, new_length: int, reps: int) -> list[float]:
    """Join + filter times (s), measured in this process (called in the child)."""
    from server.allocator import keep_freed_memory

    if tuned:
        assert keep_freed_memory() == "set"
    import torch

    from server.engine.kv_cache import BatchKVCache

    torch.set_num_threads(threads)
    times: list[float] = []

    def work() -> None:
        running = make_cache(rows, length)
        newcomers = [make_cache(1, new_length) for _ in range(3)]
        for rep in range(reps):
            start = time.perf_counter()
            joined = BatchKVCache.concatenate([running, *newcomers[: 1 + rep % 3]], spare=64)
            running = joined.select(torch.arange(rows), 0, 64)
            times.append(time.perf_counter() - start)
            del joined

    thread = threading.Thread(target=work)  # like the engine thread: its own glibc arena
    thread.start()
    thread.join()
    return times


def churn(threads: int, rows: int, length: int, new_length: int, reps: int, arrive: bool = False) -> None:
    """Leave + join per cycle, copy against in place (see the module docstring)."""
    from server.allocator import keep_freed_memory

    keep_freed_memory()
    import torch

    from server.engine.batch import fill_order
    from server.engine.kv_cache import BatchKVCache

    torch.set_num_threads(threads)

    caches = {"copy": make_cache(rows, length), "in place": make_cache(rows, length)}
    newcomer = make_cache(1, new_length)
    times: dict[str, list[float]] = {"copy": [], "in place": []}
    for cycle in range(reps):
        for side in ("copy", "in place") if cycle % 2 == 0 else ("in place", "copy"):
            cache = caches[side]
            leaver = (7 * cycle) % rows
            keep = [r for r in range(rows) if r != leaver]
            start = time.perf_counter()
            if arrive:
                if side == "copy":
                    joined = BatchKVCache.concatenate([cache, newcomer], spare=64)
                    cache = joined.select(torch.arange(rows), joined.length - length, 64)
                else:
                    assert cache.join_in_place([newcomer])
                    cache.compact(list(range(rows)))
                    cache.drop_left(cache.length - length)
            elif side == "copy":
                kept = cache.select(torch.tensor(keep), 0, 64)
                cache = BatchKVCache.concatenate([kept, newcomer], spare=64)
            else:
                cache.compact(fill_order(keep))
                assert cache.join_in_place([newcomer])
            times[side].append(time.perf_counter() - start)
            caches[side] = cache
    what = f"one of {new_length} joins and leaves again" if arrive else f"one leaves and one of {new_length} joins"
    print(f"churn: {rows} rows × {length} columns, {what} per cycle, {reps} cycles")
    print("| path | leave + join, median (ms) | max (ms) |")
    print("| --- | --- | --- |")
    for side, values in times.items():
        print(f"| {side} | {1000 * statistics.median(values):.1f} | {1000 * max(values):.1f} |")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="ABBA cycles")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--length", type=int, default=600)
    ap.add_argument("--new-length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--churn", action="store_true", help="copy against in place, one leaver and one newcomer a cycle")
    ap.add_argument("--arrive", action="store_true", help="with --churn: a longer newcomer joins and leaves again")
    ap.add_argument("--child", choices=["tuned", "defaults"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = (args.threads, args.rows, args.length, args.new_length, args.reps)
    if args.churn:
        churn(*sizes, arrive=args.arrive)
        return
    if args.child:
        print(json.dumps(child(args.child == "tuned", *sizes)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results: dict[str, list[list[float]]] = {"tuned": [], "defaults": []}
    order = ["defaults", "tuned", "tuned", "defaults"] * args.rounds
    for side in order:
        flags = {"--threads": args.threads, "--rows": args.rows, "--length": args.length,
                 "--new-length": args.new_length, "--reps": args.reps}  # fmt: skip
        cmd = [sys.executable, __file__, "--child", side, *(str(x) for kv in flags.items() for x in kv)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        times = json.loads(out.stdout.strip().splitlines()[-1])
        results[side].append(times)
        print(f"{side:8} first {1000 * times[0]:6.0f} ms, then " + " ".join(f"{1000 * t:.0f}" for t in times[1:]))
    print(f"\n{args.rows} × {args.length} + 1-3 × {args.new_length} columns, {args.threads} threads, {order}")
    print("| allocator | join + filter, median after the first (ms) | max after the first | first (median) |")
    print("| --- | --- | --- | --- |")
    for side, runs in results.items():
        later = [t for times in runs for t in times[1:]]
        first = statistics.median(times[0] for times in runs)
        print(f"| {side} | {1000 * statistics.median(later):.0f} | {1000 * max(later):.0f} | {1000 * first:.0f} |")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
