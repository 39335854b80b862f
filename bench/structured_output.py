"""What constrained decoding costs (issue 30 §5): 32 streams with a ``json_schema`` response format against the same
32 streams without, on each backend, side by side in one run (ABBA by round). Prints figures.

    .venv/bin/python bench/structured_output.py [--rounds 2] [--threads 2] [--backends hf,vllm] [--json out.json]

One hpr-serve per backend on SmolLM2 (fp32, CPU, ``--threads`` threads), the load generator's workload: 32
concurrent streaming chats of ~94 prompt tokens and 128 greedy output tokens (``ignore_eos``). The schema asks for
a list of at least 50 records ({name: string ≤ 16, score: 0-100, tags: [a|b|c]}), so no answer completes within
128 tokens: both sides generate exactly 128 tokens per request, and the difference is the grammar's per-token cost
(mask fill, mask apply, token accept). The server not measured is paused.

Metric, fixed before measuring: output tokens per second at 32 streams, constrained ÷ free, per backend (target
≥ 0.90, i.e. ≤ 10 % slower per output token). Reported beside it: tokens per CPU-second of the server's process
group, and the first request's compile time for a new schema against a schema seen before (measured apart, on an
idle server, with one request of 1 output token each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_generator
from server_process import VENV_BIN, ServerProcess
from vllm_backend import KV_BYTES, group_cpu_seconds

MODEL = "smollm2-135m-instruct"
RECORDS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "score": {"type": "integer", "minimum": 0, "maximum": 100},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                },
                "required": ["name", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "records", "schema": schema, "strict": True}}


def run_load(server: ServerProcess, constrained: bool, args: argparse.Namespace) -> dict[str, float]:
    argv = ["--base-url", server.base_url, "--model", MODEL, "--concurrency", str(args.concurrency)]
    argv += ["--requests", str(2 * args.concurrency), "--prompt-tokens", str(args.prompt_tokens)]
    argv += ["--max-tokens", str(args.max_tokens), "--temperature", "0", "--warmup", "1", "--timeout", "900"]
    if constrained:
        argv += ["--extra-body", json.dumps({"response_format": response_format(RECORDS)})]
    lg_args = load_generator.build_parser().parse_args(argv)
    load = os.getloadavg()[0]
    cpu = group_cpu_seconds(server)
    summary: dict[str, Any] = asyncio.run(load_generator.run(lg_args))
    cpu = group_cpu_seconds(server) - cpu
    generated = summary["output_tokens_mean"] * (2 * args.concurrency + 1)
    return {
        "tok_s": summary["output_tok_per_s"],
        "tok_per_cpu_s": generated / cpu if cpu > 0 else float("nan"),
        "output_tokens_mean": summary["output_tokens_mean"],
        "failed": summary["failed"],
        "load": load,
    }


def compile_seconds(server: ServerProcess) -> dict[str, float]:
    """One request of one output token with a schema never seen, then the same schema again (cached)."""
    fresh = json.loads(json.dumps(RECORDS))
    fresh["properties"]["items"]["minItems"] = 40 + int(time.time()) % 997  # a new schema each run
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0,
            "response_format": response_format(fresh)}  # fmt: skip
    free = {k: v for k, v in body.items() if k != "response_format"}
    times = {}
    with httpx.Client(timeout=600) as client:
        for label, payload in (("free", free), ("new schema", body), ("seen schema", body)):
            t = time.perf_counter()
            client.post(server.base_url + "/chat/completions", json=payload).raise_for_status()
            times[label] = time.perf_counter() - t
    return {"compile_s": times["new schema"] - times["seen schema"], **{f"{k} (s)": v for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=94)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="so-bench-"))
    common = ["--port", "{port}", "--host", "127.0.0.1", "--max-batch-size", str(args.concurrency)]
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
    servers: dict[str, ServerProcess] = {}
    for backend in args.backends.split(","):
        extra = (["--vllm-arg", f"kv_cache_memory_bytes={KV_BYTES}"] if backend == "vllm"
                 else ["--num-threads", str(args.threads)])  # fmt: skip
        servers[backend] = ServerProcess(
            f"{backend}-backend", [str(VENV_BIN / "hpr-serve"), "--backend", backend, *extra, *common], work, MODEL,
            threads=args.threads, env=vllm_env if backend == "vllm" else {},
        )  # fmt: skip
    results: dict[str, dict[str, list[dict[str, float]]]] = {b: {"free": [], "json_schema": []} for b in servers}
    compiles: dict[str, dict[str, float]] = {}
    try:
        for name, server in servers.items():
            server.start()
            server.wait_healthy(1200)
            compiles[name] = compile_seconds(server)
            server.pause()
            print(f"{name}: healthy; compile {compiles[name]}", flush=True)
        for r in range(args.rounds):
            for name, server in servers.items():
                order = ["free", "json_schema"] if r % 2 == 0 else ["json_schema", "free"]  # ABBA by round
                server.resume()
                for kind in order:
                    result = run_load(server, kind == "json_schema", args)
                    results[name][kind].append(result)
                    print(f"round {r + 1} {name} {kind}: {json.dumps({k: round(v, 2) for k, v in result.items()})}",
                          flush=True)  # fmt: skip
                server.pause()
    finally:
        for server in servers.values():
            server.stop()
    summary: dict[str, Any] = {}
    for name, kinds in results.items():
        free = statistics.median(x["tok_s"] for x in kinds["free"])
        constrained = statistics.median(x["tok_s"] for x in kinds["json_schema"])
        free_cpu = statistics.median(x["tok_per_cpu_s"] for x in kinds["free"])
        constrained_cpu = statistics.median(x["tok_per_cpu_s"] for x in kinds["json_schema"])
        summary[name] = {
            "judged: json_schema ÷ free, output tok/s (target ≥ 0.90)": round(constrained / free, 3),
            "free tok/s": round(free, 1),
            "json_schema tok/s": round(constrained, 1),
            "json_schema ÷ free, tok per CPU-s": round(constrained_cpu / free_cpu, 3),
            "output tokens per request (free, json_schema)": (
                round(statistics.median(x["output_tokens_mean"] for x in kinds["free"]), 1),
                round(statistics.median(x["output_tokens_mean"] for x in kinds["json_schema"]), 1),
            ),
            "first request with a new schema: compile (s)": round(compiles[name]["compile_s"], 3),
            "loads": [round(x["load"], 1) for k in kinds.values() for x in k],
        }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"summary": summary, "runs": results, "compile": compiles}, indent=2))


if __name__ == "__main__":
    main()
