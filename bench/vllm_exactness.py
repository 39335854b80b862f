"""The vllm backend against the hf backend on SmolLM2: how many greedy texts are equal, per edit. Prints figures.

    .venv/bin/python bench/vllm_exactness.py [--adapter runs/truthfulqa/checkpoint] [--steer runs/steer/checkpoint]
        [--prompts 100] [--max-tokens 48] [--threads 2] [--vllm-arg enforce_eager=true] [--json out.json]

The same ``--prompts`` chat prompts (TruthfulQA train-split questions, the chat template applied) are generated
greedily, all submitted at once, through each backend's engine in this process (``--backend hf``: our engine;
``--backend vllm``: vLLM in its default compiled mode unless ``--vllm-arg`` says otherwise), under each of:
no edit; the adapter's served default (its own alpha, scope and edit_tokens); alpha 2 on every position
(scope ``all``) at its selected layers; a layer list (``--layers``); and the steering vector (``--steer``, when
given). Per configuration: how many of the requests' token sequences are equal, the largest logprob difference
over the steps before the first different token (chosen token and top-5 alternatives), the same over the
requests whose tokens agree, and the step where each differing request first diverged.

Targets (issue 27): ≥ 95 of 100 equal in every configuration, and no edited configuration more than 2 below the
unedited one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from exactness import Result, compare, generate, request  # noqa: E402

from hpr.edit_spec import EditSpec  # noqa: E402
from hpr.registry import AdapterRegistry  # noqa: E402
from server.runtime import default_engine_factory  # noqa: E402
from server.settings import ServerSettings  # noqa: E402


def train_questions(n: int) -> list[str]:
    data_dir = Path(os.environ.get("HPR_TRUTHFULQA_DIR", REPO.parent / "shared" / "data" / "truthfulqa"))
    items = json.loads((data_dir / "mc_task.json").read_text())
    train = json.loads((data_dir / "ids_splits.json").read_text())["train"]
    return [str(items[i]["question"]) for i in train[:n]]


def configurations(registry: AdapterRegistry, layers: str, steer: bool) -> dict[str, EditSpec | None]:
    out: dict[str, EditSpec | None] = {
        "no edit": None,
        "served default": registry.resolve("trained"),
        "alpha 2, scope all": registry.resolve("trained", "selected", 2.0, "all", "all"),
        f"layers {layers}": registry.resolve("trained", layers, None, None, None),
    }
    if steer:
        out["steering vector"] = registry.resolve("steer")
    return out


async def run_backend(
    backend: str, args: argparse.Namespace, prompts_text: list[str]
) -> tuple[dict[str, list[Result]], dict[str, Any]]:
    settings = ServerSettings(
        backend=backend,  # type: ignore[arg-type]
        vllm_arg=args.vllm_arg if backend == "vllm" else [],
        max_batch_size=args.batch,
        max_queue=max(256, args.prompts),
        device=args.device,
        dtype="auto" if args.device != "cpu" else "float32",
        num_threads=args.threads,
    )
    registry = AdapterRegistry()
    started = time.monotonic()
    engine = default_engine_factory(settings, registry)
    startup = time.monotonic() - started
    registry.load("trained", args.adapter)
    if args.steer:
        registry.load("steer", args.steer)
    engine.start()
    tokenizer = engine.info.tokenizer
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"])
        for q in prompts_text
    ]
    results: dict[str, list[Result]] = {}
    timing: dict[str, Any] = {"startup_s": round(startup, 1)}
    try:
        for name, edit in configurations(registry, args.layers, bool(args.steer)).items():
            t = time.monotonic()
            results[name] = list(
                await asyncio.gather(
                    *(generate(engine, request(i, p, edit, args.max_tokens)) for i, p in enumerate(prompts))
                )
            )
            timing[name] = round(time.monotonic() - t, 1)
            print(f"  {backend:4s} {name}: {timing[name]} s", flush=True)
    finally:
        await engine.stop(drain_timeout=5)
    return results, timing


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    questions = train_questions(args.prompts)
    vllm_results, vllm_timing = await run_backend("vllm", args, questions)
    hf_results, hf_timing = await run_backend("hf", args, questions)
    report: dict[str, Any] = {"timing": {"vllm": vllm_timing, "hf": hf_timing}, "configurations": {}}
    for name in vllm_results:
        report["configurations"][name] = compare(vllm_results[name], hf_results[name])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(REPO / "runs" / "truthfulqa" / "checkpoint"))
    parser.add_argument("--steer", default=None, help="a steering-vector checkpoint (docs/steering.md)")
    parser.add_argument("--layers", default="10-14,20", help="the layer-list configuration")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of both engines")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    parser.add_argument("--vllm-arg", action="append", default=[], help="passed to --backend vllm; repeatable")
    parser.add_argument("--device", default="cpu", help="auto: CUDA (bf16) when present")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(f"\n{args.prompts} prompts × {args.max_tokens} greedy tokens, vllm backend vs hf backend (CPU, fp32)")
    print(f"{'configuration':24s} {'equal':>7s} {'max |Δlogprob|':>15s} {'same-token max':>15s}  diverged at step")
    floor = None
    for name, row in report["configurations"].items():
        equal = row["requests"] - row["differ"]
        floor = equal if floor is None else floor
        print(
            f"{name:24s} {equal:>4d}/{row['requests']:<3d} {row['max_logprob_diff']:>15.2e} "
            f"{row['max_logprob_diff_same_tokens']:>15.2e}  {sorted(row['first_divergence_steps'])}"
        )
    print("timing (s):", json.dumps(report["timing"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
