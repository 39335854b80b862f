"""Do running streams keep their pace while long prompts arrive? Inter-token latency with and without chunked prefill.

In-process engine on the embedded SmolLM2 (1 torch thread by default). Per round: ``--streams`` greedy streams run
alone for ``--quiet-steps`` tokens (the inter-token latency "without arrivals"), then ``--newcomers`` prompts of
``--prompt-len`` tokens arrive at once; the running streams' gaps until every newcomer has its first token are the
latency "while they arrive". Rounds alternate the ``--chunks`` settings in ABBA order on one engine (one model load).
A setting is a chunk size (0 = whole prompts) run in forwards of its own, or ``mN``: chunks of N in the same forward
as the running streams' decode step (mixed prefill, the server's default); a suffix ``bT`` adds a step budget of T
tokens (``--max-step-tokens``: the running rows and the chunk together), e.g. ``m256b40``.
After each round the same streams run again with no newcomers, and their gaps at the token indices of the arrival
window give the latency "without arrivals" at the same stream lengths (attention grows with a stream's length, so
the first tokens' gaps understate a later step's). Prints, per setting: the quiet p50 of the first tokens, the
same-length p50 without arrivals, arriving p50/p95/max, p95 ÷ same-length p50 (the figure judged since
2026-12-02: target ≤ 2) and p95 ÷ quiet p50 (the figure judged before), the newcomers' time to first token, and
the quiet decode tok/s of all streams.

    .venv/bin/python bench/chunked_prefill.py [--chunks 0,256,m256,m64] [--streams 32] [--newcomers 8]
        [--prompt-len 512] [--adapter DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from bench.percentiles import percentile
from hpr.checkpoint import HPRAdapter
from hpr.editing import HPREditor
from hpr.model import EMBEDDED_MODEL_ID, load_model
from server.allocator import keep_freed_memory
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams

SETTING = re.compile(r"(m?)(\d+)(?:b(\d+))?")


def parse_setting(setting: str) -> tuple[bool, int | None, int | None]:
    """``[m]N[bT]`` → (mixed, chunk or None for whole prompts, step budget or None)."""
    match = SETTING.fullmatch(setting)
    if match is None:
        raise SystemExit(f"bad setting {setting!r}: use N, mN, NbT or mNbT")
    return bool(match[1]), int(match[2]) or None, int(match[3]) if match[3] else None


def story_prompt(engine: Engine, round_no: int) -> list[int]:
    """The running streams' prompt in a round, and in its control run (the same length, so the same positions)."""
    return list(engine.tokenizer.encode(f"Story number {round_no}: once upon a time"))


async def one_round(engine: Engine, args: argparse.Namespace, edit: object, round_no: int) -> dict[str, float]:
    tokenizer = engine.tokenizer
    words = tokenizer.encode(" the sea and the wind" * args.prompt_len)
    short = story_prompt(engine, round_no)
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    arrived = asyncio.Event()
    first_tokens: list[float] = []

    async def stream(i: int) -> None:
        sampling = SamplingParams(max_tokens=args.stream_tokens, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"s{round_no}-{i}", short, sampling, edit=edit)  # type: ignore[arg-type]
        async for out in engine.generate(request):
            now = time.perf_counter()
            stamps[i].extend([now] * max(1, len(out.token_ids)))
            if arrived.is_set() and len(first_tokens) == args.newcomers:
                break  # measured enough: free the engine for the next round

    async def newcomer(j: int, sent: float) -> None:
        prompt = words[j : j + args.prompt_len]
        sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"n{round_no}-{j}", prompt, sampling, edit=edit)  # type: ignore[arg-type]
        async for _ in engine.generate(request):
            first_tokens.append(time.perf_counter() - sent)
            break

    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    while min(len(s) for s in stamps) < args.quiet_steps + 2:  # all running, then the quiet window
        await asyncio.sleep(0.01)
    quiet_end = time.perf_counter()
    quiet_gaps = [b - a for s in stamps for a, b in itertools.pairwise(s[1:]) if b <= quiet_end]
    quiet_tokens = sum(1 for s in stamps for t in s[1:] if t <= quiet_end)
    quiet_start = min(s[1] for s in stamps)
    arrived.set()
    sent = time.perf_counter()
    await asyncio.gather(*(newcomer(j, sent) for j in range(args.newcomers)))
    all_in = time.perf_counter()
    await asyncio.gather(*tasks)
    if any(s[-1] < all_in for s in stamps):
        raise SystemExit("a stream ended before every newcomer had its first token: raise --stream-tokens")
    arriving = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > sent and a < all_in]
    # per stream, the token indices k whose gap (token k-1 → k) fell in the arrival window
    windows = [[k for k in range(1, len(s)) if s[k] > sent and s[k - 1] < all_in] for s in stamps]
    matched = await control_gaps(engine, args, edit, round_no, windows)
    return {
        "matched_p50": statistics.median(matched),
        "quiet_p50": statistics.median(quiet_gaps),
        "arr_p50": statistics.median(arriving),
        "arr_p95": percentile(arriving, 95, nearest=True),
        "arr_max": max(arriving),
        "ttft_max": max(first_tokens),
        "quiet_tps": quiet_tokens / (quiet_end - quiet_start),
    }


async def control_gaps(
    engine: Engine, args: argparse.Namespace, edit: object, round_no: int, windows: list[list[int]]
) -> list[float]:
    """The same streams again with no newcomers: their gaps at the token indices of the arrival window. The
    streams' own attention grows with their length, so this is "without arrivals" at the same lengths."""
    short = story_prompt(engine, round_no)
    need = max(max(w, default=0) for w in windows) + 1

    async def stream(i: int) -> list[float]:
        sampling = SamplingParams(max_tokens=need, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"c{round_no}-{i}", short, sampling, edit=edit)  # type: ignore[arg-type]
        stamps: list[float] = []
        async for out in engine.generate(request):
            stamps.extend([time.perf_counter()] * max(1, len(out.token_ids)))
        return stamps

    runs = await asyncio.gather(*(stream(i) for i in range(args.streams)))
    return [s[k] - s[k - 1] for s, w in zip(runs, windows, strict=True) for k in w if k < len(s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--chunks", default="0,256,m256,m64", help="settings to compare: N = chunks of N apart (0: whole), mN = mixed"
    )
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--newcomers", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--quiet-steps", type=int, default=12)
    parser.add_argument("--stream-tokens", type=int, default=400)
    parser.add_argument("--adapter", type=Path, default=None, help="edit every request with this checkpoint's default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA cycles")
    parser.add_argument(
        "--compile-decode", action="store_true", help="decode steps through the compiled step (mixed steps stay eager)"
    )
    parser.add_argument(
        "--no-malloc-tuning", action="store_true", help="glibc's allocator defaults (hpr-serve --no-malloc-tuning)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("glibc malloc:", "defaults" if args.no_malloc_tuning else keep_freed_memory(), flush=True)
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
    adapters = {}
    if args.adapter:
        adapters["a"] = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    editor = HPREditor(loaded.model, adapters)
    settings = args.chunks.split(",")
    for setting in settings:
        parse_setting(setting)
    engine = Engine(
        loaded,
        editor.registry,
        max_batch_size=args.streams + args.newcomers,
        max_prefill_tokens=1 << 20,
        compile_decode=args.compile_decode,
    )
    # the checkpoint's defaults, every token edited (as the recorded figures; the edit_tokens default came later)
    edit = engine.editor.resolve("a", tokens="all") if args.adapter else None
    order = [s for _ in range(args.rounds) for s in (settings + settings[::-1])]
    results: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    print(f"{args.streams} streams, {args.newcomers} newcomers × {args.prompt_len} tokens, order {order}, "
          f"edit {'none' if edit is None else edit}, compiled decode {args.compile_decode}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

    async def run_all() -> None:
        engine.start()
        try:
            if args.compile_decode:  # compile the decode graph before anything is timed
                await control_gaps(engine, args, edit, -1, [[1, 2]] * args.streams)
            for i, setting in enumerate(order):
                engine.mixed_prefill, engine.prefill_chunk, engine.max_step_tokens = parse_setting(setting)
                r = await one_round(engine, args, edit, i)
                results[setting].append(r)
                print(f"  round {i} {setting}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        finally:
            await engine.stop(drain_timeout=30)

    asyncio.run(run_all())
    print(
        "setting | quiet ITL p50 (start) | same-length ITL p50 without arrivals | arriving ITL p50 / p95 / max | "
        "p95 ÷ same-length p50 (judged) | p95 ÷ quiet p50 (start) | newcomer TTFT max | quiet tok/s"
    )
    for setting in settings:
        rs = results[setting]

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        mixed, size, budget = parse_setting(setting)
        name = ("whole" if size is None else f"chunk {size}") + (" mixed" if mixed else "")
        name += f", step budget {budget}" if budget is not None else ""
        print(
            f"{name} | {med('quiet_p50') * 1e3:.0f} ms | {med('matched_p50') * 1e3:.0f} ms | "
            f"{med('arr_p50') * 1e3:.0f} / {med('arr_p95') * 1e3:.0f} / {med('arr_max') * 1e3:.0f} ms | "
            f"{med('arr_p95') / med('matched_p50'):.2f} | {med('arr_p95') / med('quiet_p50'):.2f} | "
            f"{med('ttft_max'):.2f} s | {med('quiet_tps'):.1f}"
        )
    print(
        f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}; medians over {len(order) // len(settings)} rounds"
    )


if __name__ == "__main__":
    main()
