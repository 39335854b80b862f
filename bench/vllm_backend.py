"""The vllm backend's speed (issue 27 §5), side by side in one run: hpr-serve --backend vllm against plain vLLM
(``python -m vllm.entrypoints.openai.api_server``, what ``vllm serve`` runs) and against hpr-serve --backend hf,
and the cost of the served edit and of an edit on all 30 layers. Prints figures.

    .venv/bin/python bench/vllm_backend.py [--rounds 2] [--threads 2] [--adapter runs/truthfulqa/checkpoint]
        [--concurrency 32] [--prompt-tokens 94] [--max-tokens 128] [--batch1-max-tokens 128] [--json out.json]

The three servers start as subprocesses on loopback on the same SmolLM2 weights (fp32, CPU, ``--threads``
OpenMP threads each), and ``bench/load_generator.py`` runs the same workload against each configuration: 32
concurrent streaming chats of ~94 prompt tokens and 128 greedy output tokens (``ignore_eos``), then one stream at a
time (batch 1). Configurations run in ABBA order over ``--rounds`` rounds; the servers not measured are paused
(SIGSTOP on their process groups: vLLM's engine core and workers too).

Metrics, fixed before measuring:
- between servers (vllm backend ÷ plain vLLM, vllm backend ÷ hf backend): output tok/s at 32 streams (what a
  client gets); at batch 1, decode tok/s = 1 / median time per output token;
- edit cost (the vllm backend with an edit ÷ without): output tokens per CPU-second of the server's whole process
  group (the same server and code path; steadier than tok/s on a shared machine). tok/s is printed next to it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_generator
from server_process import REPO, VENV_BIN, ServerProcess, bench_adapter

ADAPTER = "truthfulqa"
# The dearest edit: every trained layer, every position, every generated token (the adapter's alpha).
ALL_LAYERS = {"adapter": ADAPTER, "layers": "all", "scope": "all", "edit_tokens": "all"}
KV_BYTES = str(2 * 1024**3)


def group_cpu_seconds(server: ServerProcess) -> float:
    """CPU seconds of every process in the server's process group (vLLM runs its engine in child processes)."""
    if server.proc is None:
        return float("nan")
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == server.proc.pid:  # pgrp: start_new_session made the server its group leader
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Config:
    label: str
    server: str
    model: str
    concurrency: int
    requests: int
    max_tokens: int
    hpr: dict[str, Any] | None = None


def run_one(cfg: Config, server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--base-url", server.base_url, "--model", cfg.model, "--concurrency", str(cfg.concurrency)]
    argv += ["--requests", str(cfg.requests), "--prompt-tokens", str(args.prompt_tokens)]
    argv += ["--max-tokens", str(cfg.max_tokens), "--temperature", "0", "--warmup", "1", "--timeout", "900"]
    if cfg.hpr is not None:
        argv += ["--hpr-configs", json.dumps([cfg.hpr])]
    lg_args = load_generator.build_parser().parse_args(argv)
    load = os.getloadavg()[0]
    cpu = group_cpu_seconds(server)
    summary: dict[str, Any] = asyncio.run(load_generator.run(lg_args))
    cpu = group_cpu_seconds(server) - cpu
    generated = summary["output_tokens_mean"] * (cfg.requests + 1)
    return {
        "tok_s": summary["output_tok_per_s"],
        "tok_per_cpu_s": generated / cpu if cpu > 0 else float("nan"),
        "decode_tok_s": 1000.0 / summary["tpot_ms_p50"] if summary["tpot_ms_p50"] else float("nan"),
        "ttft_ms_p50": summary["ttft_ms_p50"],
        "itl_ms_p50": summary["itl_ms_p50"],
        "itl_ms_p95": summary["itl_ms_p95"],
        "failed": summary["failed"],
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", default=None, help="default: runs/truthfulqa/checkpoint, else a random one")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=94)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch1-max-tokens", type=int, default=128)
    parser.add_argument("--bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND for both vLLM servers (e.g. auto)")
    parser.add_argument("--skip", default="", help="comma list of server names not to run: hf, plain")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    adapter, described = bench_adapter(work, args.adapter)
    print(f"adapter: {described}", flush=True)
    from hpr.model import resolve_model_source

    model_id, model_dir = resolve_model_source("smollm2-135m-instruct")
    # vLLM's CPU worker binds one OpenMP thread per listed core; its default ("auto") keeps one core of two for
    # its front end and computes on the other. --threads binds the same number as the hf backend's torch threads.
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": args.bind or f"0-{args.threads - 1}"}
    common = ["--port", "{port}", "--host", "127.0.0.1", "--max-batch-size", str(args.concurrency)]
    servers = {
        "vllm": ServerProcess(
            "vllm-backend",
            [str(VENV_BIN / "hpr-serve"), "--backend", "vllm", "--adapter", f"{ADAPTER}={adapter}", *common],
            work,
            model_id,
            threads=args.threads,
            env=vllm_env,
        ),
        "hf": ServerProcess(
            "hf-backend",
            [
                str(VENV_BIN / "hpr-serve"),
                "--adapter",
                f"{ADAPTER}={adapter}",
                "--num-threads",
                str(args.threads),
                *common,
            ],
            work,
            model_id,
            threads=args.threads,
        ),
        "plain": ServerProcess(
            "plain-vllm",
            [
                str(VENV_BIN / "python"),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                model_dir,
                "--served-model-name",
                model_id,
                "--dtype",
                "float32",
                "--kv-cache-memory-bytes",
                KV_BYTES,
                "--max-num-seqs",
                str(args.concurrency),
                "--port",
                "{port}",
                "--host",
                "127.0.0.1",
            ],
            work,
            model_id,
            threads=args.threads,
            env=vllm_env,
        ),
    }
    for name in [s for s in args.skip.split(",") if s]:
        servers.pop(name)
    n, c = args.concurrency, 2 * args.concurrency
    configs = [
        Config("vllm backend, no edit", "vllm", model_id, n, c, args.max_tokens),
        Config("vllm backend, served edit", "vllm", ADAPTER, n, c, args.max_tokens),
        Config(
            "vllm backend, all 30 layers",
            "vllm",
            model_id,
            n,
            c,
            args.max_tokens,
            ALL_LAYERS,
        ),
        Config("plain vLLM", "plain", model_id, n, c, args.max_tokens),
        Config("hf backend, no edit", "hf", model_id, n, c, args.max_tokens),
        Config("vllm backend, batch 1", "vllm", model_id, 1, 4, args.batch1_max_tokens),
        Config("hf backend, batch 1", "hf", model_id, 1, 4, args.batch1_max_tokens),
    ]
    configs = [cfg for cfg in configs if cfg.server in servers]
    results: dict[str, list[dict[str, Any]]] = {cfg.label: [] for cfg in configs}
    started = {}
    try:
        for name, server in servers.items():
            t = time.monotonic()
            server.start()
            server.wait_healthy(1200)
            started[name] = round(time.monotonic() - t, 1)
            server.pause()
            print(f"{name} healthy in {started[name]} s", flush=True)
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else list(reversed(configs))
            for cfg in order:
                server = servers[cfg.server]
                server.resume()
                try:
                    row = run_one(cfg, server, args)
                finally:
                    server.pause()
                results[cfg.label].append(row)
                print(f"round {r + 1} {cfg.label}: {json.dumps({k: round(v, 2) for k, v in row.items()})}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def med(label: str, key: str) -> float:
        values = [row[key] for row in results.get(label, [])]
        return statistics.median(values) if values else float("nan")

    print(f"\nstartup (s): {started}; {os.cpu_count()} cores, threads {args.threads}, rounds {args.rounds}")
    head = f"{'configuration':32s} {'tok/s':>8s} {'tok/CPU-s':>10s} {'decode tok/s':>13s} {'TTFT p50':>9s}"
    print(head + f" {'ITL p50/p95 ms':>15s}")
    for cfg in configs:
        lab = cfg.label
        print(
            f"{lab:32s} {med(lab, 'tok_s'):8.1f} {med(lab, 'tok_per_cpu_s'):10.1f} {med(lab, 'decode_tok_s'):13.1f} "
            f"{med(lab, 'ttft_ms_p50'):8.0f}ms {med(lab, 'itl_ms_p50'):7.0f}/{med(lab, 'itl_ms_p95'):<7.0f}"
        )
    ratios = {
        "vllm backend ÷ plain vLLM, tok/s (target ≥ 0.95)": med("vllm backend, no edit", "tok_s")
        / med("plain vLLM", "tok_s"),
        "vllm backend ÷ hf backend, 32 streams tok/s (target ≥ 1.6)": med("vllm backend, no edit", "tok_s")
        / med("hf backend, no edit", "tok_s"),
        "vllm backend ÷ hf backend, batch-1 decode (target ≥ 1.3)": med("vllm backend, batch 1", "decode_tok_s")
        / med("hf backend, batch 1", "decode_tok_s"),
        "served edit ÷ no edit, tok/CPU-s (target ≥ 0.95)": med("vllm backend, served edit", "tok_per_cpu_s")
        / med("vllm backend, no edit", "tok_per_cpu_s"),
        "all 30 layers ÷ no edit, tok/CPU-s (target ≥ 0.85)": med("vllm backend, all 30 layers", "tok_per_cpu_s")
        / med("vllm backend, no edit", "tok_per_cpu_s"),
        "served edit ÷ no edit, tok/s": med("vllm backend, served edit", "tok_s")
        / med("vllm backend, no edit", "tok_s"),
        "all 30 layers ÷ no edit, tok/s": med("vllm backend, all 30 layers", "tok_s")
        / med("vllm backend, no edit", "tok_s"),
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"results": results, "ratios": ratios, "startup_s": started}, indent=2) + "\n"
        )


if __name__ == "__main__":
    os.chdir(REPO)
    main()
