"""Server-level benchmarks of issue 3 §9, side by side in ONE run.

Starts, as subprocesses on 127.0.0.1: ``hpr-serve`` (with the bench adapter), ``transformers serve
--continuous-batching`` on the same SmolLM2 weights, and the seed's generation path
(``bench/seed_generation_server.py``). Then runs ``bench/load_generator.py`` (N concurrent streaming clients,
fixed prompt and output lengths, greedy, ``ignore_eos``) against each configuration of each scenario,
interleaved in ABBA order (A B C, then C B A, …) over ``--rounds`` (at least 2, for every scenario) so that load
drifts on this shared machine hit every side alike; servers not being measured are paused (SIGSTOP). Prints one
table per scenario (aggregate output tok/s and output tokens per server CPU-second side by side, TTFT p50/p95,
inter-token latency p50/p95, time per output token p50, the 1-minute load average around each run) and each
target with both ratios, judged by the metric fixed for it beforehand (``Target.metric``): tok/s when two
different servers are compared (what a client gets; a server that idles or spins would distort per-CPU-second),
output tokens per server CPU-second when one server is compared with itself under different edits (the same
process and code path; removes the ±20 % swing of the CPU share a server gets on a shared machine).

    .venv/bin/python bench/compare_servers.py                      # every scenario, ~15-25 min on 2 busy cores
    .venv/bin/python bench/compare_servers.py --scenarios seed,batch1 --rounds 2
    .venv/bin/python bench/compare_servers.py --quick              # smoke test: tiny lengths, two rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_generator
from server_process import VENV_BIN, ServerProcess, bench_adapter, transformers_serve_model_dir

ADAPTER = "bench"  # the adapter's id in hpr-serve and in the seed server


@dataclass
class Config:
    """One measured configuration: a server, a `model`, optional `hpr` objects (round-robin) and extra fields."""

    label: str
    server: str
    model: str
    hpr_configs: list[dict[str, Any]] | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    ignore_eos: bool = True  # send the `ignore_eos` extension (transformers serve rejects it with a 422)


TOK_S = "tok_s"  # aggregate output tokens per wall second (median over rounds)
TOK_PER_CPU_S = "tok_per_cpu_s"  # output tokens per CPU-second the server process used (median over rounds)


@dataclass(frozen=True)
class Target:
    """``numerator`` / ``denominator`` ≥ ``minimum`` on ``metric``, the metric chosen before measuring."""

    text: str
    numerator: str
    denominator: str
    minimum: float
    metric: str  # TOK_S or TOK_PER_CPU_S


@dataclass
class Scenario:
    name: str
    title: str
    configs: list[Config]
    concurrency: int
    requests: int
    prompt_tokens: int
    max_tokens: int
    targets: list[Target]


def top5_layers(config: Any) -> list[int]:
    """The adapter's 5 trained layers with the best probe accuracy (the seed's default k = 5), sorted."""
    ranked = sorted(config.layers, key=lambda layer: -config.probe_accuracy.get(layer, 0.0))
    return sorted(ranked[:5])


def build_scenarios(
    args: argparse.Namespace, tserve_model: str, base: str, layers: list[int], top5: list[int]
) -> list[Scenario]:
    """The §9 scenarios. ``layers``: the adapter's trained layers; ``top5``: its 5 best (see :func:`top5_layers`)."""
    q = args.quick
    c32 = 8 if q else 32
    waves = c32 * (1 if q else args.waves)  # requests per run
    stream_len = dict(prompt_tokens=32 if q else 64, max_tokens=8 if q else args.max_tokens)
    tserve_len = dict(prompt_tokens=32 if q else 64, max_tokens=8 if q else args.tserve_max_tokens)
    # transformers serve has no ignore_eos; a request-level generation config with an eos id never sampled does it
    tserve_eos = {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}
    tserve = Config("transformers serve --cb", "tserve", tserve_model, extra_body=tserve_eos, ignore_eos=False)
    hpr_base = Config("hpr-serve, no edit", "hpr", base)
    top5_cfg = Config("hpr-serve, HPR top-5", "hpr", ADAPTER, [{"layers": top5}])
    every = Config(f"hpr-serve, HPR all {len(layers)} layers", "hpr", ADAPTER, [{"layers": "all"}])
    chunks = [layers[i : i + 5] for i in range(0, len(layers), 5)][:6]
    distinct = [{"layers": chunk} for chunk in chunks] + [{"layers": top5, "alpha": a} for a in (0.5, 1.5)]
    return [
        Scenario(
            "tserve",
            f"hpr-serve vs transformers serve --continuous-batching, {c32} streams",
            [tserve, hpr_base, top5_cfg],
            c32,
            c32,
            **tserve_len,
            targets=[
                Target(
                    "hpr-serve (no edit) / transformers serve ≥ 1.5",
                    hpr_base.label,
                    "transformers serve --cb",
                    1.5,
                    TOK_S,
                )
            ],
        ),
        Scenario(
            "edits",
            f"HPR edit cost on hpr-serve, {c32} streams",
            [hpr_base, top5_cfg, every],
            c32,
            waves,
            **stream_len,
            targets=[
                Target("top-5 / no edit ≥ 0.98 (≤ 2 % cost)", top5_cfg.label, hpr_base.label, 0.98, TOK_PER_CPU_S),
                Target("all layers / no edit ≥ 0.92 (≤ 8 % cost)", every.label, hpr_base.label, 0.92, TOK_PER_CPU_S),
            ],
        ),
        Scenario(
            "mixed",
            f"{len(distinct)} distinct edit configs vs one config among {c32} streams (5 layers each)",
            [
                Config("hpr-serve, one config (top-5)", "hpr", ADAPTER, [{"layers": top5}]),
                Config(f"hpr-serve, {len(distinct)} distinct configs", "hpr", ADAPTER, distinct),
            ],
            c32,
            waves,
            **stream_len,
            targets=[
                Target(
                    f"{len(distinct)} configs / one config ≥ 0.95 (≤ 5 % cost)",
                    f"hpr-serve, {len(distinct)} distinct configs",
                    "hpr-serve, one config (top-5)",
                    0.95,
                    TOK_PER_CPU_S,
                )
            ],
        ),
        Scenario(
            "seed",
            "hpr-serve vs the seed's generation path (no KV cache, h×h matrix, one at a time), 8 streams",
            [
                Config("seed path, HPR top-5", "seed", ADAPTER, extra_body={}),
                Config(
                    "hpr-serve, HPR top-5, scope generated",
                    "hpr",
                    ADAPTER,
                    [{"layers": top5, "scope": "generated"}],
                ),
            ],
            8,
            8,
            prompt_tokens=32 if q else args.seed_prompt_tokens,
            max_tokens=4 if q else args.seed_max_tokens,
            targets=[
                Target(
                    "hpr-serve / seed path ≥ 20",
                    "hpr-serve, HPR top-5, scope generated",
                    "seed path, HPR top-5",
                    20.0,
                    TOK_S,
                )
            ],
        ),
        Scenario(
            "batch1",
            "batch-1 decode (one stream; bound ≈ 34 tok/s fp32 here)",
            [
                hpr_base,
                top5_cfg,
                tserve,
            ],
            1,
            2,
            prompt_tokens=32,
            max_tokens=16 if q else args.batch1_max_tokens,
            targets=[],
        ),
    ]


def run_config(lg: Any, sc: Scenario, cfg: Config, server: ServerProcess, time_limit: float) -> dict[str, Any]:
    """One run of ``bench/load_generator.py`` (in-process, bounded by ``time_limit``) against ``server``."""
    argv = [
        "--base-url",
        server.base_url,
        "--model",
        cfg.model,
        "--concurrency",
        str(sc.concurrency),
        "--requests",
        str(sc.requests),
        "--prompt-tokens",
        str(sc.prompt_tokens),
        "--max-tokens",
        str(sc.max_tokens),
        "--temperature",
        "0",
        "--warmup",
        "1",
        "--timeout",
        str(time_limit),
    ]
    if cfg.hpr_configs:
        argv += ["--hpr-configs", json.dumps(cfg.hpr_configs)]
    if not cfg.ignore_eos:
        argv.append("--no-ignore-eos")
    if cfg.extra_body:
        argv += ["--extra-body", json.dumps(cfg.extra_body)]
    args = lg.build_parser().parse_args(argv)
    load_before = os.getloadavg()[0]
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    try:
        summary: dict[str, Any] = asyncio.run(asyncio.wait_for(lg.run(args), timeout=time_limit))
    except TimeoutError:
        summary = {"failed": sc.requests, "requests": sc.requests, "errors": [f"time limit {time_limit:.0f} s hit"]}
    summary.pop("args", None)
    summary.pop("per_request", None)
    elapsed = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu_before
    # Output tokens the server generated per CPU-second it got (warm-up request included): much less sensitive
    # to other jobs on the machine than tok/s, which also depends on the CPU share the server was given.
    generated = summary.get("output_tokens_mean", float("nan")) * (sc.requests + 1)
    summary.update(
        label=cfg.label, load_before=load_before, load_after=os.getloadavg()[0], elapsed_s=elapsed,
        server_cpu_s=cpu, server_cpu_share=cpu / elapsed, tok_per_cpu_s=generated / cpu if cpu > 0 else float("nan"),
    )  # fmt: skip
    return summary


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def summarize(sc: Scenario, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for cfg in sc.configs:
        rs = runs[cfg.label]
        tps = [r.get("output_tok_per_s", float("nan")) for r in rs]
        rows.append(
            {
                "label": cfg.label,
                "tok_s": _median(tps),
                "tok_s_runs": tps,
                "tok_per_cpu_s_runs": [r.get("tok_per_cpu_s", float("nan")) for r in rs],
                **{
                    k: _median([r.get(k, float("nan")) for r in rs])
                    for k in (
                        "ttft_ms_p50",
                        "ttft_ms_p95",
                        "itl_ms_p50",
                        "itl_ms_p95",
                        "tpot_ms_p50",
                        "tok_per_cpu_s",
                        "server_cpu_share",
                        "output_tokens_mean",
                        "prompt_tokens_mean",
                    )
                },
                "failed": sum(int(r.get("failed", 0)) for r in rs),
                "errors": sorted({e for r in rs for e in r.get("errors", [])}),
                "load": [round(r["load_before"], 2) for r in rs] + [round(rs[-1]["load_after"], 2)] if rs else [],
            }
        )
    by_label = {row["label"]: row for row in rows}
    targets = []
    for t in sc.targets:
        num, den = by_label[t.numerator], by_label[t.denominator]
        ratio = num[TOK_S] / den[TOK_S] if den[TOK_S] else float("nan")
        cpu_ratio = num[TOK_PER_CPU_S] / den[TOK_PER_CPU_S] if den[TOK_PER_CPU_S] else float("nan")
        judged = ratio if t.metric == TOK_S else cpu_ratio
        targets.append(
            {"target": t.text, "metric": t.metric, "ratio": ratio, "cpu_ratio": cpu_ratio, "met": judged >= t.minimum}
        )
    return {
        "name": sc.name,
        "title": sc.title,
        "concurrency": sc.concurrency,
        "requests": sc.requests,
        "prompt_tokens": sc.prompt_tokens,
        "max_tokens": sc.max_tokens,
        "rows": rows,
        "targets": targets,
    }


def print_table(result: dict[str, Any], markdown: bool) -> None:
    head = [
        "configuration",
        "tok/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "TPOT p50 ms",
        "out tok/req",
        "failed",
        "tok/CPU-s",
        "CPU share",
        "load 1-min",
    ]
    print(f"\n## {result['title']}")
    print(
        f"concurrency {result['concurrency']}, {result['requests']} requests/run, prompt ≈ "
        f"{_median([r['prompt_tokens_mean'] for r in result['rows']]):.0f} tok (chat template included), max_tokens "
        f"{result['max_tokens']}, greedy; medians over rounds (tok/s of each round in the JSON);\n"
        "tok/CPU-s: output tokens per CPU-second the server process used (warm-up included); "
        "CPU share: its CPU-seconds per wall second\n"
    )
    lines = [head] + [
        [
            r["label"],
            f"{r['tok_s']:.1f}",
            f"{r['ttft_ms_p50']:.0f}",
            f"{r['ttft_ms_p95']:.0f}",
            f"{r['itl_ms_p50']:.1f}",
            f"{r['itl_ms_p95']:.1f}",
            f"{r['tpot_ms_p50']:.1f}",
            f"{r['output_tokens_mean']:.1f}",
            str(r["failed"]),
            f"{r['tok_per_cpu_s']:.1f}",
            f"{r['server_cpu_share']:.2f}",
            "→".join(f"{x:.1f}" for x in r["load"]),
        ]
        for r in result["rows"]
    ]
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "---|" * len(lines[0]))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for line in lines:
            print(
                "  ".join(
                    cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(line, widths, strict=True))
                )
            )
    for row in result["rows"]:
        for error in row["errors"]:
            print(f"  error ({row['label']}): {error}")
    for t in result["targets"]:
        judge = "tok/s" if t["metric"] == TOK_S else "tok/CPU-s"
        print(
            f"  target {t['target']}, judged on {judge}: tok/s ratio {t['ratio']:.2f}, tok/CPU-s ratio "
            f"{t['cpu_ratio']:.2f} → {'MET' if t['met'] else 'NOT met'}"
        )
    if result["name"] == "batch1":
        for r in result["rows"]:
            if r["tpot_ms_p50"] == r["tpot_ms_p50"] and r["tpot_ms_p50"] > 0:
                print(f"  {r['label']}: decode {1000 / r['tpot_ms_p50']:.1f} tok/s (1000 / TPOT p50)")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="tserve,edits,mixed,seed,batch1", help="comma list of scenario names")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds per scenario, ≥ 2 (each config once a round)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, edits/mixed scenarios")
    p.add_argument("--waves", type=int, default=1, help="requests per run = waves × 32, edits/mixed scenarios")
    p.add_argument("--tserve-max-tokens", type=int, default=32, help="output tokens per request, tserve scenario")
    p.add_argument("--batch1-max-tokens", type=int, default=64, help="output tokens per request, batch1 scenario")
    p.add_argument("--seed-max-tokens", type=int, default=16, help="output tokens per request, seed scenario")
    p.add_argument("--seed-prompt-tokens", type=int, default=32, help="prompt tokens (before the template), seed")
    p.add_argument("--adapter", default=None, help="adapter dir (default: runs/truthfulqa/checkpoint, else random)")
    p.add_argument(
        "--tserve-args",
        default="--cb-num-blocks 48 --cb-max-batch-tokens 2048",
        help="extra flags for transformers serve (its CPU default sizes the KV cache at 60%% of free RAM: ~14 GB here)",
    )
    p.add_argument("--time-limit", type=float, default=1200.0, help="seconds per load-generator run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every server (OMP_NUM_THREADS); default: torch's own (one per core)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 8 streams, short outputs, two rounds")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--json", dest="json_out", default=None, help="write all results to this JSON file")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be ≥ 2: every pairing is measured in both orders (ABBA)")
    rounds = 2 if args.quick else args.rounds
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]

    work = Path(tempfile.mkdtemp(prefix="hpr-bench-"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    adapter_dir, adapter_note = bench_adapter(work, args.adapter)
    from hpr.checkpoint import HPRAdapter

    adapter_cfg = HPRAdapter.load(adapter_dir).config
    tserve_dir = transformers_serve_model_dir(work)
    base = "smollm2-135m-instruct"
    top5 = top5_layers(adapter_cfg)
    by_name = {s.name: s for s in build_scenarios(args, str(tserve_dir), base, adapter_cfg.layers, top5)}
    scenarios = [by_name[name] for name in wanted if name in by_name]  # in the order asked for
    unknown = set(wanted) - set(by_name)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    needed = {c.server for s in scenarios for c in s.configs}
    servers = {
        "hpr": ServerProcess(
            "hpr-serve",
            [
                str(VENV_BIN / "hpr-serve"),
                "--adapter",
                f"{ADAPTER}={adapter_dir}",
                "--port",
                "{port}",
                "--max-batch-size",
                "32",
                "--log-level",
                "warning",
            ],
            log_dir,
            base,
        ),
        "tserve": ServerProcess(
            "transformers-serve",
            [
                str(VENV_BIN / "transformers"),
                "serve",
                "--continuous-batching",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--device",
                "cpu",
                *args.tserve_args.split(),
                str(tserve_dir),
            ],
            log_dir,
            str(tserve_dir),
        ),
        "seed": ServerProcess(
            "seed-path",
            [
                sys.executable,
                str(Path(__file__).with_name("seed_generation_server.py")),
                "--adapter",
                str(adapter_dir),
                "--adapter-name",
                ADAPTER,
                "--layers",
                ",".join(map(str, top5)),
                "--port",
                "{port}",
            ],
            log_dir,
            base,
        ),
    }
    print(
        f"adapter: {adapter_note}; trained layers {adapter_cfg.layers}, selected {adapter_cfg.selected_layers}, "
        f"top-5 by probe accuracy (what the 'top-5' configurations edit) {top5}"
    )
    for server in servers.values():
        server.threads = args.threads
    print(f"logs: {log_dir}; load average at start: {os.getloadavg()}; server threads: {args.threads or 'default'}")
    lg: Any = load_generator
    signal.signal(signal.SIGTERM, _interrupt)  # stop the servers on SIGTERM as on Ctrl-C
    results: list[dict[str, Any]] = []
    try:
        for key in needed:
            servers[key].start()
        for key in needed:
            servers[key].wait_healthy(timeout=300)
            servers[key].pause()
        for sc in scenarios:
            runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in sc.configs}
            n_rounds = rounds
            for r in range(n_rounds):
                order = sc.configs if r % 2 == 0 else list(reversed(sc.configs))
                for cfg in order:
                    server = servers[cfg.server]
                    server.resume()
                    print(f"[{sc.name} round {r + 1}/{n_rounds}] {cfg.label} ...", flush=True)
                    runs[cfg.label].append(run_config(lg, sc, cfg, server, args.time_limit))
                    server.pause()
            results.append(summarize(sc, runs))
            print_table(results[-1], args.markdown)
            if args.json_out:  # after every scenario, so a cut-short run keeps what it measured
                meta = {"adapter": adapter_note, "cpu_count": os.cpu_count(), "finished": time.time()}
                Path(args.json_out).write_text(json.dumps({"meta": meta, "scenarios": results}, indent=2) + "\n")
    finally:
        # A second Ctrl-C or a SIGTERM must not leave orphaned servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for server in servers.values():
            server.stop()
    print("\n(all scenarios)")
    for res in results:
        print_table(res, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
