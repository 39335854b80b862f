r"""Load generator for any OpenAI-compatible server: N concurrent streaming clients, fixed prompt and output lengths.

Prints aggregate generated tok/s, TTFT p50/p95, inter-token latency p50/p95/p99/max (gaps between streamed chunks) and
time per output token (per request: (last − first chunk) / (tokens − 1)). Works against ``hpr-serve``, vLLM, or
``transformers serve --continuous-batching`` (chat endpoint; servers that ignore ``ignore_eos`` may stop early:
the report shows the tokens actually generated).

    python bench/load_generator.py --base-url http://127.0.0.1:8000/v1 --concurrency 32 --requests 64 \
        --prompt-tokens 128 --max-tokens 64
    # 8 distinct HPR edit configs spread over the streams (hpr-serve only):
    python bench/load_generator.py --model truthful --hpr-configs '[{"alpha": 0.5}, {"layers": "all"}]'

``transformers serve`` refuses unknown fields (so no ``ignore_eos``) and ignores ``stream_options``; fix the output
length through its ``generation_config`` field instead:

    python bench/load_generator.py --base-url http://127.0.0.1:8001/v1 --model <path or hub id> --no-ignore-eos \
        --extra-body '{"generation_config": "{\"min_new_tokens\": 64, \"max_new_tokens\": 64}"}'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from percentiles import percentile


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = 0.0  # seconds from sending the request to the first content chunk
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive content chunks
    chunks: int = 0
    tokens: int = 0  # from the usage chunk when the server sends one, else the chunk count
    prompt_tokens: int = 0
    latency: float = 0.0  # seconds, whole request

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or not self.gaps:
            return None
        return sum(self.gaps) / (self.tokens - 1)


def make_prompt(tokens: int) -> str:
    """About ``tokens`` tokens for common BPE tokenizers (" the" is one token); the server reports the truth."""
    return "Repeat after me:" + " the" * max(0, tokens - 4)


def build_body(args: argparse.Namespace, prompt: str, hpr: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if hpr is not None:
        body["hpr"] = hpr
    if getattr(args, "extra_body", None):
        body.update(json.loads(args.extra_body))
    return body


async def one_request(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult(ok=False)
    started = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.chunks += 1
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - started
    result.tokens = result.tokens or result.chunks
    result.ok = True
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    path = "/chat/completions" if args.endpoint == "chat" else "/completions"
    configs: list[dict[str, Any] | None] = json.loads(args.hpr_configs) if args.hpr_configs else [None]
    prompt = make_prompt(args.prompt_tokens)
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(
        base_url=args.base_url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as client:
        for i in range(args.warmup):
            await one_request(client, path, build_body(args, prompt, configs[i % len(configs)]))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, path, build_body(args, prompt, configs[i % len(configs)])))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    return summarize(args, results, wall)


def summarize(args: argparse.Namespace, results: list[RequestResult], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    ms = 1000.0
    return {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else math.nan,
        "output_tokens_mean": tokens / len(ok) if ok else math.nan,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall if wall > 0 else math.nan,
        "requests_per_s": len(ok) / wall if wall > 0 else math.nan,
        "ttft_ms_p50": percentile([r.ttft for r in ok], 50) * ms,
        "ttft_ms_p95": percentile([r.ttft for r in ok], 95) * ms,
        "itl_ms_p50": percentile(gaps, 50) * ms,
        "itl_ms_p95": percentile(gaps, 95) * ms,
        "itl_ms_p99": percentile(gaps, 99) * ms,
        "itl_ms_max": max(gaps) * ms if gaps else math.nan,
        "tpot_ms_p50": percentile(tpots, 50) * ms,
        "tpot_ms_p95": percentile(tpots, 95) * ms,
        "latency_s_p50": percentile([r.latency for r in ok], 50),
        "args": {k: v for k, v in vars(args).items() if k != "api_key"},
        "per_request": [asdict(r) | {"gaps": len(r.gaps)} for r in results] if args.per_request else None,
    }


def print_report(summary: dict[str, Any]) -> None:
    print(
        f"{summary['base_url']}  model={summary['model']}  endpoint={summary['endpoint']}  "
        f"concurrency={summary['concurrency']}  requests={summary['requests']}  failed={summary['failed']}"
    )
    print(
        f"  prompt ≈ {summary['prompt_tokens_mean']:.0f} tok, "
        f"output ≈ {summary['output_tokens_mean']:.1f} tok/request, wall {summary['wall_s']:.2f} s"
    )
    print(f"  throughput      {summary['output_tok_per_s']:9.1f} output tok/s   {summary['requests_per_s']:.2f} req/s")
    print(f"  TTFT            p50 {summary['ttft_ms_p50']:9.1f} ms   p95 {summary['ttft_ms_p95']:9.1f} ms")
    print(
        f"  inter-token     p50 {summary['itl_ms_p50']:9.1f} ms   p95 {summary['itl_ms_p95']:9.1f} ms   "
        f"p99 {summary['itl_ms_p99']:9.1f} ms   max {summary['itl_ms_max']:9.1f} ms"
    )
    print(f"  time/out token  p50 {summary['tpot_ms_p50']:9.1f} ms   p95 {summary['tpot_ms_p95']:9.1f} ms")
    for error in summary["errors"]:
        print(f"  error: {error}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL (with /v1).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="`model` field of every request.")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--concurrency", type=int, default=8, help="Concurrent streaming clients.")
    p.add_argument("--requests", type=int, default=None, help="Total requests (default: 2 × concurrency).")
    p.add_argument("--prompt-tokens", type=int, default=128, help="Approximate prompt length in tokens.")
    p.add_argument("--max-tokens", type=int, default=64, help="Output tokens per request.")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false",
        help="Do not send the ignore_eos extension (then outputs may stop early at eos).",
    )  # fmt: skip
    p.add_argument("--hpr-configs", default=None, help="JSON list of `hpr` objects, assigned round-robin.")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body.")
    p.add_argument("--warmup", type=int, default=1, help="Sequential warm-up requests (not measured).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    p.add_argument("--json", dest="json_out", default=None, help="Also write the summary as JSON to this file.")
    p.add_argument("--per-request", action="store_true", help="Include per-request results in the JSON.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.max_tokens < 1:
        print("--concurrency and --max-tokens must be ≥ 1", file=sys.stderr)
        return 2
    args.requests = args.requests or 2 * args.concurrency
    try:
        if args.extra_body and not isinstance(json.loads(args.extra_body), dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"--extra-body: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(run(args))
    print_report(summary)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    return 1 if summary["failed"] == summary["requests"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
