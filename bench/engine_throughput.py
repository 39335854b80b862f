"""Engine throughput on SmolLM2 (in-process, no HTTP), side by side in one run. Prints figures; asserts nothing.

    .venv/bin/python bench/engine_throughput.py [--prompt-len 64] [--gen-len 64] [--repeats 2]

Scenarios (greedy, fixed prompt and output lengths, ``ignore_eos``):
- aggregate decode tok/s at 1, 8 and 32 concurrent requests (no edit);
- HF ``generate`` on a static batch of 32 vs the engine with 32 concurrent requests;
- HPR on all 30 layers, on the top-5 layers, vs no edit (32 streams);
- 8 distinct edit configs among 32 streams vs one config;
- batch-1 decode tok/s (the memory-bandwidth bound here is ≈ 34 tok/s in fp32).

The adapter (``--adapter``) is the trained checkpoint ``runs/truthfulqa/checkpoint`` when it exists, else (or with
``--adapter random``) a random ``HPRAdapter`` of SmolLM2's shape (hidden 576, 30 layers). The cost of an edit
depends on the weights: on CPU the angle MLP — most of an edited layer's arithmetic — runs only on the tokens the
probe marks negative (``HPRLayer.edit``; the trained TruthfulQA adapter marks ~9 % of (token, layer) pairs, a
random one ~51 %), so a random adapter does not stand for a trained one where arithmetic dominates (prefill);
in a 32-row decode step the per-op overhead dominates and both measured the same. ``--compare-random`` adds the
random adapter's rows to the step-interleaved run, side by side. (On CUDA every token goes through the angle
MLP, to avoid a host sync.)

Paired scenarios run interleaved (A, B, A, B, …) and each keeps its best repeat, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.editing import EditPlan, EditSpec, HPREditor
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model
from server.engine.batch import Batch, RequestState
from server.engine.engine import Engine
from server.engine.runner import ModelRunner
from server.engine.sampling import new_generator
from server.engine.types import GenerationRequest, SamplingParams

ADAPTER = "bench"
RANDOM = "random"
TRAINED_CHECKPOINT = Path(__file__).resolve().parent.parent / "runs" / "truthfulqa" / "checkpoint"


@dataclass
class StepClock:
    """Observer collecting token timestamps, to separate steady decode from prefill."""

    token_times: list[float] = field(default_factory=list)
    first_token_times: list[float] = field(default_factory=list)

    def on_step(self, batch_size: int) -> None:
        pass

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self.first_token_times.append(time.perf_counter())

    def on_token(self, request_id: str, seconds_since_last: float) -> None:
        self.token_times.append(time.perf_counter())

    def on_finish(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def on_edit(self, layer: int, tokens: int) -> None:
        pass


@dataclass
class RunResult:
    wall: float  # seconds from the first submit to the last token
    tokens: int  # tokens generated
    decode_tok_s: float  # tokens after every request got its first one, per second of that phase
    cpu: float = float("nan")  # CPU-seconds this process used meanwhile (every thread)

    @property
    def e2e_tok_s(self) -> float:
        return self.tokens / self.wall

    @property
    def tok_per_cpu_s(self) -> float:
        return self.tokens / self.cpu


def fmt(label: str, r: RunResult) -> str:
    return (
        f"{label:<44} {r.e2e_tok_s:>9.1f} tok/s e2e  {r.tok_per_cpu_s:>9.1f} tok/CPU-s  "
        f"{r.decode_tok_s:>9.1f} tok/s decode  ({r.wall:.2f} s)"
    )


def random_adapter(loaded: LoadedModel, seed: int = 0, name: str = ADAPTER) -> HPRAdapter:
    torch.manual_seed(seed)
    layers = list(range(loaded.num_layers))
    accuracy = {layer: float(a) for layer, a in zip(layers, torch.rand(len(layers)).tolist(), strict=True)}
    top5 = sorted(layers, key=lambda layer: -accuracy[layer])[:5]
    config = HPRConfig(
        base_model=loaded.model_id,
        hidden_size=loaded.hidden_size,
        num_layers=loaded.num_layers,
        layers=layers,
        selected_layers=top5,
        probe_accuracy=accuracy,
    )
    adapter = HPRAdapter(config, name=name)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter.eval()


def prompt_ids(loaded: LoadedModel, length: int, index: int) -> list[int]:
    text = f"Request {index}: tell me everything you know about the history of computing and mathematics. " * 20
    ids: list[int] = loaded.tokenizer.encode(text)[:length]
    return ids


async def run_engine(
    engine: Engine, loaded: LoadedModel, n: int, prompt_len: int, gen_len: int, edits: list[EditSpec | None]
) -> RunResult:
    clock = StepClock()
    engine.observer = clock

    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
        request = GenerationRequest(f"b{i}", prompt_ids(loaded, prompt_len, i), params, edit=edits[i % len(edits)])
        count = 0
        async for out in engine.generate(request):
            count += len(out.token_ids)
        return count

    start, cpu = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.observer = None
    all_started = max(clock.first_token_times)
    late = [t for t in clock.token_times if t > all_started]
    decode = len(late) / (max(late) - all_started) if late else float("nan")
    return RunResult(wall=wall, tokens=sum(counts), decode_tok_s=decode, cpu=cpu)


def run_hf_generate(loaded: LoadedModel, n: int, prompt_len: int, gen_len: int) -> RunResult:
    ids = torch.tensor([prompt_ids(loaded, prompt_len, i) for i in range(n)], device=loaded.device)
    with torch.inference_mode():
        start, cpu = time.perf_counter(), time.process_time()
        out = loaded.model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen_len,
            min_new_tokens=gen_len,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = (out.shape[1] - ids.shape[1]) * n
    return RunResult(wall=wall, tokens=tokens, decode_tok_s=float("nan"), cpu=cpu)


def step_interleaved(
    loaded: LoadedModel,
    editor: HPREditor,
    configs: dict[str, list[EditSpec | None]],
    n: int,
    prompt_len: int,
    gen_len: int,
    repeats: int,
) -> dict[str, tuple[float, float, float]]:
    """Ratios robust to a shared machine: the engine's runner, with the configs' prefills and decode steps
    interleaved one by one (A, B, C, A, B, C, …), so load drift hits every config alike.

    Returns per config (median prefill seconds, median decode-step seconds, median decode-step CPU-seconds) at
    ``n`` rows.
    """
    runner = ModelRunner(loaded.model, editor, pad_id=0, vocab_size=len(loaded.tokenizer))
    loop = asyncio.new_event_loop()

    def states(edits: list[EditSpec | None]) -> list[RequestState]:
        out = []
        for i in range(n):
            params = SamplingParams(max_tokens=gen_len + 1, temperature=0.0, ignore_eos=True)
            request = GenerationRequest(f"s{i}", prompt_ids(loaded, prompt_len, i), params, edit=edits[i % len(edits)])
            out.append(RequestState(request, loop, asyncio.Queue(), new_generator(0), frozenset(), gen_len + 1))
        return out

    prefill_times: dict[str, list[float]] = {name: [] for name in configs}
    step_times: dict[str, list[float]] = {name: [] for name in configs}
    step_cpu: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for _ in range(repeats):
            batches: dict[str, Batch] = {}
            for name, edits in configs.items():
                start = time.perf_counter()
                outcome = runner.prefill(states(edits))
                prefill_times[name].append(time.perf_counter() - start)
                assert outcome.batch is not None
                batches[name] = outcome.batch
            for _ in range(gen_len - 1):
                for name in configs:
                    start, cpu = time.perf_counter(), time.process_time()
                    outcome = runner.decode(batches[name])
                    step_times[name].append(time.perf_counter() - start)
                    step_cpu[name].append(time.process_time() - cpu)
                    assert outcome.batch is not None
                    batches[name] = outcome.batch
    return {
        name: (
            statistics.median(prefill_times[name]),
            statistics.median(step_times[name]),
            statistics.median(step_cpu[name]),
        )
        for name in configs
    }


def marked_share(loaded: LoadedModel, editor: HPREditor, name: str, n: int, prompt_len: int) -> float:
    """Share of (token, layer) pairs the adapter's probes mark negative — those that go through the angle MLP on
    CPU — over ``n`` prompts with every trained layer edited (one forward, stats collected)."""
    ids = torch.tensor([prompt_ids(loaded, prompt_len, i) for i in range(n)], device=loaded.device)
    spec = editor.resolve(name, "all")
    plan = EditPlan([spec] * n, collect_stats=True)
    with torch.inference_mode(), editor.apply(plan):
        loaded.model(input_ids=ids)
    rows = [plan.row_stats(row).layers for row in range(n)]
    tokens = sum(s.tokens for layers in rows for s in layers.values())
    return sum(s.changed for layers in rows for s in layers.values()) / tokens


def print_step_costs(results: dict[str, tuple[float, float, float]], baseline: str, n: int, gen_len: int) -> None:
    """Per config: median decode step (wall and CPU) and its cost against ``baseline``, in tok/s and tok/CPU-s."""
    base_prefill, base_step, base_cpu = results[baseline]
    base_total = base_prefill + (gen_len - 1) * base_step
    for name, (prefill_s, step_s, cpu_s) in results.items():
        total = prefill_s + (gen_len - 1) * step_s
        print(
            f"{name:<12} decode step {1e3 * step_s:7.1f} ms ({n / step_s:6.1f} tok/s), {1e3 * cpu_s:7.1f} CPU-ms "
            f"({n / cpu_s:6.1f} tok/CPU-s)   vs {baseline}: tok/s {base_step / step_s:.3f}, "
            f"tok/CPU-s {base_cpu / cpu_s:.3f}   prefill {prefill_s:6.2f} s "
            f"({100 * (prefill_s / base_prefill - 1):+5.1f} %), whole request {100 * (total / base_total - 1):+5.1f} %"
        )


def best(results: list[RunResult]) -> RunResult:
    return max(results, key=lambda r: r.e2e_tok_s)


def interleaved(runs: dict[str, Callable[[], RunResult]], repeats: int) -> dict[str, RunResult]:
    results: dict[str, list[RunResult]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(fn())
    return {name: best(r) for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL_ID)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--only", default="", help="comma list of: scale,hf,hpr,mixed,b1,steps (default all)")
    parser.add_argument(
        "--adapter", default=None, help="adapter dir, or 'random' (default: runs/truthfulqa/checkpoint, else random)"
    )
    parser.add_argument(
        "--compare-random", action="store_true", help="steps: also the random adapter's rows, interleaved"
    )
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else {"scale", "hf", "hpr", "mixed", "b1", "steps"}
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="auto", dtype="auto")
    source = args.adapter or (str(TRAINED_CHECKPOINT) if TRAINED_CHECKPOINT.is_dir() else RANDOM)
    if source == RANDOM:
        chosen = random_adapter(loaded)
    else:
        chosen = HPRAdapter.load(source, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)
    adapters = {ADAPTER: chosen}
    if args.compare_random and source != RANDOM:
        adapters[RANDOM] = random_adapter(loaded, name=RANDOM)
    editor = HPREditor(loaded.model, adapters)
    adapter = editor.adapters[ADAPTER]
    accuracy = adapter.config.probe_accuracy
    top5 = tuple(sorted(sorted(adapter.config.layers, key=lambda layer: -accuracy.get(layer, 0.0))[:5]))
    print(
        f"# {loaded.model_id} {loaded.dtype} on {loaded.device}, torch threads {torch.get_num_threads()}, "
        f"prompt {args.prompt_len} tok, output {args.gen_len} tok, best of {args.repeats}"
    )
    print(f"# adapter: {source}; 'top5' = its 5 best layers by probe accuracy {list(top5)}")
    print(f"# load average before: {os.getloadavg()}")

    loop = asyncio.new_event_loop()
    engine = Engine(loaded, editor.registry, max_batch_size=32, max_queue=256)
    engine.start()

    def engine_run(n: int, edits: list[EditSpec | None]) -> Callable[[], RunResult]:
        return lambda: loop.run_until_complete(run_engine(engine, loaded, n, args.prompt_len, args.gen_len, edits))

    engine_run(4, [None])()  # warm-up
    all_layers = editor.resolve(ADAPTER, "all")
    top5_spec = editor.resolve(ADAPTER, list(top5))
    if "scale" in only:
        print("\n## concurrency (no edit)")
        for n in (1, 8, 32):
            r = interleaved({"x": engine_run(n, [None])}, args.repeats)["x"]
            print(fmt(f"engine, {n} concurrent", r))

    if "hf" in only:
        print("\n## vs HF generate, static batch of 32 (target ≥ 0.9×)")
        res = interleaved(
            {
                "hf": lambda: run_hf_generate(loaded, 32, args.prompt_len, args.gen_len),
                "engine": engine_run(32, [None]),
            },
            args.repeats,
        )
        print(fmt("HF generate, batch 32", res["hf"]))
        print(fmt("engine, 32 concurrent", res["engine"]))
        print(
            f"ratio engine / HF generate: tok/s {res['engine'].e2e_tok_s / res['hf'].e2e_tok_s:.3f}, "
            f"tok/CPU-s {res['engine'].tok_per_cpu_s / res['hf'].tok_per_cpu_s:.3f}"
        )

    if "hpr" in only:
        print("\n## HPR cost, 32 streams (targets: all 30 layers ≤ 8 %, top-5 ≤ 2 %)")
        res = interleaved(
            {
                "none": engine_run(32, [None]),
                "all": engine_run(32, [all_layers]),
                "top5": engine_run(32, [top5_spec]),
            },
            args.repeats,
        )
        for name in ("none", "all", "top5"):
            r = res[name]
            print(fmt(f"edit {name}", r))
        for name in ("all", "top5"):
            cost = 1 - res[name].e2e_tok_s / res["none"].e2e_tok_s
            cost_decode = 1 - res[name].decode_tok_s / res["none"].decode_tok_s
            print(f"cost of {name}: {100 * cost:.1f} % e2e, {100 * cost_decode:.1f} % decode")

    layer_sets = [  # 5 layers each: the same work as the single config
        top5,
        (0, 1, 2, 3, 4),
        (10, 11, 12, 13, 14),
        (20, 21, 22, 23, 24),
        (5, 10, 15, 20, 25),
        (1, 7, 13, 19, 25),
        (2, 9, 16, 23, 29),
        (25, 26, 27, 28, 29),
    ]
    alphas = [1.0, 0.5, 1.5, 2.0, 1.0, 0.8, 1.2, 3.0]
    configs: list[EditSpec | None] = [
        editor.resolve(ADAPTER, list(layers), alpha=a, scope="generated" if i % 2 else "all")
        for i, (layers, a) in enumerate(zip(layer_sets, alphas, strict=True))
    ]

    same_layers: list[EditSpec | None] = [  # 8 configs differing in alpha and scope only, all on the top-5 layers
        editor.resolve(ADAPTER, list(top5), alpha=a, scope="generated" if i % 2 else "all")
        for i, a in enumerate(alphas)
    ]

    if "steps" in only:
        print("\n## step-interleaved (engine runner, 32 rows; robust to load drift)")
        step_configs: dict[str, list[EditSpec | None]] = {
            "none": [None],
            "all": [all_layers],
            "top5": [top5_spec],
            "8 configs": configs,
            "8 on top5": same_layers,
        }
        if RANDOM in editor.adapters:
            step_configs["random all"] = [editor.resolve(RANDOM, "all")]
            step_configs["random top5"] = [editor.resolve(RANDOM, list(top5))]
        for name in (n for n in (ADAPTER, RANDOM) if n in editor.adapters):
            share = marked_share(loaded, editor, name, 32, args.prompt_len)
            print(f"adapter {name!r}: probes mark {100 * share:.1f} % of (token, layer) pairs (prompts, all layers)")
        results = step_interleaved(loaded, editor, step_configs, 32, args.prompt_len, args.gen_len, args.repeats)
        edit_rows = [k for k in ("none", "all", "top5", "random all", "random top5") if k in results]
        print_step_costs({k: results[k] for k in edit_rows}, "none", 32, args.gen_len)
        print_step_costs({k: results[k] for k in ("top5", "8 configs", "8 on top5")}, "top5", 32, args.gen_len)

    if "mixed" in only:
        print("\n## 8 distinct edit configs among 32 streams vs 1 config (target ≤ 5 %)")
        res = interleaved({"one": engine_run(32, [top5_spec]), "eight": engine_run(32, configs)}, args.repeats)
        for name in ("one", "eight"):
            r = res[name]
            print(fmt(f"{name} config(s)", r))
        print(
            f"cost of 8 configs: {100 * (1 - res['eight'].e2e_tok_s / res['one'].e2e_tok_s):.1f} % e2e, "
            f"{100 * (1 - res['eight'].decode_tok_s / res['one'].decode_tok_s):.1f} % decode"
        )
        layers_edited = statistics.mean(len(c.layers) for c in configs if c is not None)
        print(f"(mean edited layers per config: {layers_edited:.1f} vs 5 for the single config)")

    if "b1" in only:
        print("\n## batch-1 decode (bound ≈ 34 tok/s fp32 here)")
        res = interleaved(
            {
                "engine": engine_run(1, [None]),
                "hf": lambda: run_hf_generate(loaded, 1, args.prompt_len, args.gen_len),
            },
            args.repeats,
        )
        print(fmt("engine, 1 request", res["engine"]))
        print(fmt("HF generate, batch 1", res["hf"]))

    loop.run_until_complete(engine.stop())
    print(f"\n# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
