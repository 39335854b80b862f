"""How fast are over-capacity requests refused? 429 latency under a burst of concurrent chat requests.

Starts ``hpr-serve`` (default: the embedded SmolLM2, ``--max-batch-size 32 --max-queue 64``), sends N concurrent
chat requests at once, and prints how many were served and refused, and the latency of the 429s (p50/p99) — with
the machine's load average, since on a shared CPU that decides most of it. The admitted requests keep the engine
busy while the refusals happen, which is the point: a refusal must not wait for tokenizing or for the model.

    .venv/bin/python bench/refusal_latency.py [--concurrency 256] [--max-tokens 32] [--client raw|httpx]
        [--model DIR] [--base-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx

from bench.percentiles import percentile
from hpr.model import EMBEDDED_MODEL_ID
from trainer.gen_client import LocalServer


def _body(max_tokens: int) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


async def _burst_httpx(base_url: str, concurrency: int, max_tokens: int) -> list[tuple[int, float]]:
    body = _body(max_tokens)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        # open the connections first, so the burst measures the server and not TCP handshakes
        await asyncio.gather(*(client.get("/health") for _ in range(concurrency)))
        start = asyncio.Event()

        async def one() -> tuple[int, float]:
            await start.wait()
            t0 = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code, time.perf_counter() - t0

        tasks = [asyncio.create_task(one()) for _ in range(concurrency)]
        await asyncio.sleep(0.1)
        start.set()
        return list(await asyncio.gather(*tasks))


async def _read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response (the server always sends Content-Length here); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def _burst_raw(base_url: str, concurrency: int, max_tokens: int) -> list[tuple[int, float]]:
    """The same burst from a minimal client: one open keep-alive socket per request, the request bytes built
    beforehand, the clock stopped when the whole response has been read. Little client work competes with the
    server for the CPU, so the figure is close to what the server itself costs."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    payload = json.dumps(_body(max_tokens)).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    probe = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    for reader, writer in connections:  # a round trip on each first: the sockets are open and warm
        writer.write(probe)
        await writer.drain()
        await _read_response(reader)
    start = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        await start.wait()
        t0 = time.perf_counter()
        writer.write(request)
        status = await _read_response(reader)
        return status, time.perf_counter() - t0

    tasks = [asyncio.create_task(one(r, w)) for r, w in connections]
    await asyncio.sleep(0.1)
    start.set()
    results = list(await asyncio.gather(*tasks))
    for _, writer in connections:
        writer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--model", default=None, help="hpr-serve --model (default: the embedded SmolLM2)")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--base-url", default=None, help="measure a running server instead of starting one")
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="raw: a minimal asyncio socket client (the figure the target is judged on); httpx: httpx.AsyncClient",
    )
    args = parser.parse_args()

    def measure(base_url: str) -> tuple[list[tuple[int, float]], float, float]:
        load_before = os.getloadavg()[0]
        burst = _burst_raw if args.client == "raw" else _burst_httpx
        results = asyncio.run(burst(base_url, args.concurrency, args.max_tokens))
        return results, load_before, os.getloadavg()[0]

    if args.base_url is not None:
        results, load_before, load_after = measure(args.base_url)
    else:
        flags = ["--max-queue", str(args.max_queue)]
        with LocalServer(
            args.model or EMBEDDED_MODEL_ID, {}, threads=args.num_threads, max_batch_size=args.max_batch_size,
            extra_args=flags,
        ) as server:  # fmt: skip
            results, load_before, load_after = measure(server.root_url)
    refused = [seconds for status, seconds in results if status == 429]
    served = [seconds for status, seconds in results if status == 200]
    other = sorted({status for status, _ in results} - {200, 429})
    capacity = args.max_batch_size + args.max_queue
    print(
        f"{args.concurrency} concurrent chat requests, capacity {capacity} (max_batch_size {args.max_batch_size} "
        f"+ max_queue {args.max_queue}), max_tokens {args.max_tokens}, client {args.client}"
    )
    print(f"served: {len(served)}  refused (429): {len(refused)}  other statuses: {other or 'none'}")
    if refused:
        p50, p99 = percentile(refused, 50, nearest=True) * 1000, percentile(refused, 99, nearest=True) * 1000
        print(
            f"429 latency: p50 {p50:.0f} ms  p99 {p99:.0f} ms  max {max(refused) * 1000:.0f} ms  "
            f"mean {statistics.fmean(refused) * 1000:.0f} ms"
        )
    if served:
        print(f"served latency: p50 {percentile(served, 50, nearest=True):.1f} s  max {max(served):.1f} s")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
