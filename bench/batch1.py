"""One person's chat: batch-1 decode speed in-process and over HTTP, against HF ``generate`` and the memory bound.

All in one run, on the embedded SmolLM2 in fp32 with ``--threads`` torch threads (default 1), rounds in ABBA order:

- **bound**: the fastest a decode step can be when it only streams the weights. Measured two ways on this machine:
  (a) ``weights-GEMV``: one matrix-vector product with every weight matrix of the model (what a batch-1 step must
  at least do), timed back to back; (b) ``read``: ``torch.sum`` over a buffer of the model's size. tok/s = 1 / time.
- **HF generate**: ``model.generate`` at batch 1, greedy, no edit (eager, HF's dynamic cache).
- **engine**: ``Engine.generate`` in this process, batch 1, with the trained adapter's default edit
  (``--adapter``, default ``runs/truthfulqa/checkpoint``; none if missing).
- **engine (compiled)** and **HTTP (compiled)**, with ``--compiled``: the same engine, and a second server, with the
  compiled decode step (``--compile-decode``; with ``--autotune`` also ``--compile-autotune``).
- **HTTP**: the same request streamed from ``hpr-serve`` (a subprocess with the same adapter) by a minimal
  asyncio client; the clock runs from the first streamed token to the last.

Decode tok/s = (tokens − 1) / (time of the last token − time of the first), so prefill is left out everywhere.

    .venv/bin/python bench/batch1.py [--tokens 64] [--rounds 2] [--threads 1] [--adapter DIR] [--quantization int8]
                                     [--compiled [--autotune]]

With ``--isolate`` every side runs alone in a process of its own (started afresh for each sample, in ABBA order;
the compiled side reads inductor's cache after its first compile): needed above one thread, where sides sharing
a process slow each other (each thread that runs torch ops keeps an OpenMP team, and with more OpenMP threads than
cores libgomp sleeps between parallel regions). Sides: bound, HF generate, engine, and with ``--compiled`` engine
(compiled); no HTTP sides (the servers are processes of their own already: ``bench/http_overhead.py``).

With ``--quantization int8`` every side runs int8 weights; the bound is still the fp32 one. With ``--quantization
both`` an int8 engine runs beside the fp32 sides (and, with ``--compiled``, a compiled int8 engine too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from hpr.checkpoint import HPRAdapter
from hpr.editing import HPREditor
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams
from trainer.gen_client import LocalServer

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every distinct 2-D weight (the tied embedding / LM head once)."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.dim() == 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out.append(p.detach())
    return out


def bound_gemv(mats: list[torch.Tensor]) -> float:
    vecs = [torch.randn(m.shape[1]) for m in mats]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for m, v in zip(mats, vecs, strict=True):
            torch.mv(m, v)
        best = min(best, time.perf_counter() - t)
    return 1 / best


def bound_read(nbytes: int) -> tuple[float, float]:
    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9, 1 / best


def decode_rate(stamps: list[float], tokens: int) -> float:
    return (tokens - 1) / (stamps[-1] - stamps[0])


def hf_generate(loaded: LoadedModel, ids: list[int], n: int) -> float:
    stamps: list[float] = []

    class Clock:
        def put(self, _value: torch.Tensor) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    inputs = torch.tensor([ids])
    with torch.inference_mode():
        loaded.model.generate(  # type: ignore[operator]
            inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            streamer=Clock(), pad_token_id=loaded.tokenizer.eos_token_id,
        )  # fmt: skip
    return decode_rate(stamps[1:], n)  # the streamer's first put is the prompt


async def engine_generate(engine: Engine, ids: list[int], n: int, edit: object, tag: str) -> float:
    sampling = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    stamps: list[float] = []
    async for out in engine.generate(GenerationRequest(tag, ids, sampling, edit=edit)):  # type: ignore[arg-type]
        stamps.extend([time.perf_counter()] * len(out.token_ids))
    return decode_rate(stamps, n)


async def http_stream(root_url: str, ids: list[int], n: int, adapter: str | None, model: str) -> float:
    host, port = root_url.removeprefix("http://").split(":")
    body: dict[str, object] = {
        "model": model, "prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
    }  # fmt: skip
    if adapter:
        body["hpr"] = {"adapter": adapter}
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    stamps: list[float] = []
    while line := await reader.readline():
        if line.startswith(b"data: {") and b'"text"' in line:
            stamps.append(time.perf_counter())
    writer.close()
    if not stamps:
        raise RuntimeError("no token was streamed")
    # A frame may carry more than one token (text held back until it decodes), so the rate is the n - 1 tokens
    # after the first frame over the time to the last frame.
    return (n - 1) / (stamps[-1] - stamps[0])


ISOLATED_SIDES = ("bound (weights-GEMV)", "HF generate", "engine")


def one_side(args: argparse.Namespace) -> None:
    """One sample of one side in this process (``--side``), printed as the last line. Loading runs on a thread that
    ends before the timing (as in hpr-serve), so the only OpenMP team alive is the timed thread's."""
    held: dict[str, object] = {}

    def load() -> None:
        loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32")
        adapters = {}
        if args.adapter.exists():
            adapters["a"] = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
        held.update(loaded=loaded, editor=HPREditor(loaded.model, adapters))

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    loaded, editor = held["loaded"], held["editor"]
    assert isinstance(loaded, LoadedModel) and isinstance(editor, HPREditor)
    ids = list(loaded.tokenizer(PROMPT)["input_ids"])
    if args.side == "bound (weights-GEMV)":
        rate = bound_gemv(weight_matrices(loaded.model))
    elif args.side == "HF generate":
        hf_generate(loaded, ids, 8)  # warm-up
        rate = hf_generate(loaded, ids, args.tokens)
    else:
        compiled = args.side == "engine (compiled)"
        engine = Engine(loaded, editor.registry, compile_decode=compiled, compile_autotune=compiled and args.autotune)
        edit = editor.resolve("a") if "a" in editor.registry.names() else None
        loop = asyncio.new_event_loop()
        engine.start()
        try:
            loop.run_until_complete(engine_generate(engine, ids, args.tokens, edit, "warm-up"))
            rate = loop.run_until_complete(engine_generate(engine, ids, args.tokens, edit, "timed"))
        finally:
            loop.run_until_complete(engine.stop(drain_timeout=10))
    print(json.dumps({"side": args.side, "rate": rate}))


def isolated(args: argparse.Namespace) -> None:
    """Every side alone in a fresh process per sample, ABBA (``--isolate``)."""
    names = [*ISOLATED_SIDES, *(["engine (compiled)"] if args.compiled else [])]
    common = ["--threads", str(args.threads), "--tokens", str(args.tokens), "--adapter", str(args.adapter)]
    if args.autotune:
        common.append("--autotune")

    def sample(name: str) -> float:
        out = subprocess.run(
            [sys.executable, __file__, "--side", name, *common], capture_output=True, text=True, check=True
        ).stdout.strip()
        return float(json.loads(out.splitlines()[-1])["rate"])

    print(f"SmolLM2 fp32, {args.threads} thread(s), {args.tokens} tokens, each side alone in its own process; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    if args.compiled:
        sample("engine (compiled)")  # the first compile fills inductor's cache; not counted
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names + names[::-1]:
            results[name].append(sample(name))
            print(f"  {name}: {results[name][-1]:.1f}", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print("what | decode tok/s (median; runs)")
    for name, values in results.items():
        print(f"{name} | {med[name]:.1f}; {', '.join(f'{v:.1f}' for v in values)}")
    for name in names[2:]:
        print(f"{name} / HF generate: {med[name] / med['HF generate']:.2f}× (target ≥ 1.6); "
              f"/ bound (weights-GEMV): {med[name] / med['bound (weights-GEMV)']:.0%} (target ≥ 85 %)")  # fmt: skip
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA cycles")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapter", type=Path, default=Path("runs/truthfulqa/checkpoint"))
    parser.add_argument(
        "--quantization",
        choices=("none", "int8", "both"),
        default="none",
        help="every side's weights (int8 needs torchao); both: fp32 everywhere plus an int8 engine side by side",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also an engine with the compiled decode step (--compile-decode)"
    )
    parser.add_argument(
        "--autotune", action="store_true", help="the compiled sides compile with --compile-autotune (max-autotune)"
    )
    parser.add_argument("--isolate", action="store_true", help="each side alone in a process of its own (see above)")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)  # one isolated sample: print it and exit
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.isolate:
        if args.quantization != "none":
            parser.error("--isolate measures fp32 only; --quantization runs without it")
        return isolated(args)
    if args.side is not None:
        return one_side(args)
    main_quant = "none" if args.quantization == "both" else args.quantization
    loaded = load_model(EMBEDDED_MODEL_ID, "cpu", "float32", quantization=main_quant)
    ids = list(loaded.tokenizer(PROMPT)["input_ids"])
    adapters = {}
    if args.adapter.exists():
        adapters["a"] = HPRAdapter.load(args.adapter, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    editor = HPREditor(loaded.model, adapters)
    engine = Engine(loaded, editor.registry)
    edit = editor.resolve("a") if adapters else None
    fp32_model = loaded.model if main_quant == "none" else load_model(EMBEDDED_MODEL_ID, "cpu", "float32").model
    int8_engine = int8_compiled = None
    if args.quantization == "both":
        loaded8 = load_model(EMBEDDED_MODEL_ID, "cpu", "float32", quantization="int8")
        adapters8 = {}
        if adapters:
            adapters8["a"] = HPRAdapter.load(
                args.adapter, hidden_size=loaded8.hidden_size, num_layers=loaded8.num_layers
            )
        registry8 = HPREditor(loaded8.model, adapters8).registry
        int8_engine = Engine(loaded8, registry8)
        if args.compiled:
            int8_compiled = Engine(loaded8, registry8, compile_decode=True, compile_autotune=args.autotune)
    compiled_engine = (
        Engine(loaded, editor.registry, compile_decode=True, compile_autotune=args.autotune) if args.compiled else None
    )
    mats = weight_matrices(fp32_model)
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    print(
        f"SmolLM2 fp32 (weights {args.quantization}), {args.threads} thread(s), {args.tokens} tokens, edit {edit}; "
        f"fp32 weights {nbytes / 1e6:.0f} MB; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[str, list[float]] = {"bound (weights-GEMV)": [], "HF generate": [], "engine": [], "HTTP": []}
    loop = asyncio.new_event_loop()
    engine.start()
    if int8_engine is not None:
        int8_engine.start()
        results["engine (int8)"] = []
    if int8_compiled is not None:
        int8_compiled.start()
        results["engine (int8, compiled)"] = []
    if compiled_engine is not None:
        compiled_engine.start()
        results["engine (compiled)"] = []
        results["HTTP (compiled)"] = []
    paths = {"a": args.adapter} if adapters else {}
    try:
        flags = ["--quantization", main_quant]
        with contextlib.ExitStack() as servers:
            server = servers.enter_context(
                LocalServer(EMBEDDED_MODEL_ID, paths, "cpu", "float32", args.threads, extra_args=flags)
            )
            compiled_server = (
                servers.enter_context(
                    LocalServer(
                        EMBEDDED_MODEL_ID,
                        paths,
                        "cpu",
                        "float32",
                        args.threads,
                        extra_args=[*flags, "--compile-decode", *(["--compile-autotune"] if args.autotune else [])],
                    )
                )
                if args.compiled
                else None
            )
            runs: dict[str, Callable[[], float]] = {
                "bound (weights-GEMV)": lambda: bound_gemv(mats),
                "HF generate": lambda: hf_generate(loaded, ids, args.tokens),
                "engine": lambda: loop.run_until_complete(
                    engine_generate(engine, ids, args.tokens, edit, f"b1-{time.time()}")
                ),
                "HTTP": lambda: loop.run_until_complete(
                    http_stream(server.root_url, ids, args.tokens, "a" if adapters else None, EMBEDDED_MODEL_ID)
                ),
            }
            if int8_engine is not None:
                runs["engine (int8)"] = lambda: loop.run_until_complete(
                    engine_generate(int8_engine, ids, args.tokens, edit, f"b1q-{time.time()}")
                )
            if int8_compiled is not None:
                runs["engine (int8, compiled)"] = lambda: loop.run_until_complete(
                    engine_generate(int8_compiled, ids, args.tokens, edit, f"b1qc-{time.time()}")
                )
            if compiled_engine is not None and compiled_server is not None:
                runs["engine (compiled)"] = lambda: loop.run_until_complete(
                    engine_generate(compiled_engine, ids, args.tokens, edit, f"b1c-{time.time()}")
                )
                runs["HTTP (compiled)"] = lambda: loop.run_until_complete(
                    http_stream(
                        compiled_server.root_url, ids, args.tokens, "a" if adapters else None, EMBEDDED_MODEL_ID
                    )
                )
            for run in runs.values():  # warm-up, not counted (the compiled engine compiles here)
                run()
            names = list(runs)
            for _ in range(args.rounds):
                for name in names + names[::-1]:
                    results[name].append(runs[name]())
            gbs, read_tps = bound_read(nbytes)
    finally:
        loop.run_until_complete(engine.stop(drain_timeout=10))
        if int8_engine is not None:
            loop.run_until_complete(int8_engine.stop(drain_timeout=10))
        if compiled_engine is not None:
            loop.run_until_complete(compiled_engine.stop(drain_timeout=10))
        if int8_compiled is not None:
            loop.run_until_complete(int8_compiled.stop(drain_timeout=10))
    med = {k: statistics.median(v) for k, v in results.items()}
    print("what | decode tok/s (median; runs)")
    for name, values in results.items():
        print(f"{name} | {med[name]:.1f}; {', '.join(f'{v:.1f}' for v in values)}")
    print(f"bound (read, torch.sum over {nbytes / 1e6:.0f} MB) | {read_tps:.1f} ({gbs:.1f} GB/s)")
    bound = med["bound (weights-GEMV)"]
    print(f"engine / HF generate: {med['engine'] / med['HF generate']:.2f}× (target ≥ 1.6)")
    print(f"engine / bound (weights-GEMV): {med['engine'] / bound:.0%} (target ≥ 85 %)")
    print(f"HTTP / engine: {med['HTTP'] / med['engine']:.2f}× (target ≥ 0.9)")
    for name in ("engine (compiled)", "engine (int8)", "engine (int8, compiled)"):
        if name in med:
            print(f"{name} / HF generate: {med[name] / med['HF generate']:.2f}×; / bound: {med[name] / bound:.0%}")
    if "engine (int8)" in med:
        print(f"engine int8 / engine fp32: {med['engine (int8)'] / med['engine']:.2f}×")
    if "engine (compiled)" in med:
        print(f"engine compiled / engine eager: {med['engine (compiled)'] / med['engine']:.2f}×")
        print(f"engine compiled / HF generate: {med['engine (compiled)'] / med['HF generate']:.2f}×")
        print(f"engine compiled / bound (weights-GEMV): {med['engine (compiled)'] / bound:.0%}")
        print(f"HTTP compiled / engine compiled: {med['HTTP (compiled)'] / med['engine (compiled)']:.2f}×")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
