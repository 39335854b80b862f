"""The engine on CUDA (SmolLM2, bf16): mixed edits in one batch, and a short throughput figure (printed, and written
to ``$HPR_GPU_REPORT`` as JSON when set; no timing is asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hpr.editing import EditSpec, HPREditor
from hpr.model import LoadedModel
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.gpu.conftest import ADAPTER, REQUIRES_CUDA, chat_ids, smollm2_adapter
from tests.server.engine.conftest import StepSizes

pytestmark = REQUIRES_CUDA


@pytest.fixture(scope="module")
def editor(cuda_bf16: LoadedModel) -> Iterator[HPREditor]:
    editor = HPREditor(cuda_bf16.model, {ADAPTER: smollm2_adapter(cuda_bf16)})
    yield editor
    editor.detach()


def greedy(i: int, prompt: list[int], edit: EditSpec | None, tokens: int) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    return GenerationRequest(f"r{i}", prompt, sampling, edit=edit, return_stats=edit is not None)


async def serve(engine: Engine, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    async def one(r: GenerationRequest) -> list[GenerationOutput]:
        return [out async for out in engine.generate(r)]

    engine.start()
    try:
        return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await engine.stop()


def test_engine_serves_different_edits_in_one_batch_on_cuda(cuda_bf16: LoadedModel, editor: HPREditor) -> None:
    prompt = chat_ids(cuda_bf16, "What happens if you swallow gum?")
    edits = [
        None,
        editor.resolve(ADAPTER),  # the adapter's defaults (trained: layers 16, 17, 19 at alpha 2)
        editor.resolve(ADAPTER, "all", alpha=1.0),
        editor.resolve(ADAPTER, alpha=4.0, scope="generated"),
        editor.resolve(ADAPTER, "none"),
    ]
    observer = StepSizes()
    engine = Engine(cuda_bf16, editor.registry, observer=observer)
    results = asyncio.run(serve(engine, [greedy(i, prompt, e, 16) for i, e in enumerate(edits)]))
    assert max(observer.sizes) == len(edits)  # every request in one forward pass at some step
    tokens = [[t for o in outs for t in o.token_ids] for outs in results]
    assert all(len(t) == 16 for t in tokens)
    lps = [[lp.logprob for o in outs for lp in o.logprobs or []] for outs in results]
    for edited in (1, 2, 3):
        assert tokens[edited] != tokens[0] or lps[edited] != lps[0], f"edit {edited} changed nothing"
        stats = results[edited][-1].edit_stats
        assert stats and sum(s.changed for s in stats.layers.values()) > 0
    assert results[4][-1].finish_reason == "length"


def run_streams(loaded: LoadedModel, editor: HPREditor, edit: EditSpec | None, n: int, tokens: int) -> float:
    prompts = [chat_ids(loaded, f"Question {i}: tell me about the history of mathematics.") for i in range(n)]
    engine = Engine(loaded, editor.registry, max_batch_size=n)
    start = time.perf_counter()
    results = asyncio.run(serve(engine, [greedy(i, p, edit, tokens) for i, p in enumerate(prompts)]))
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for outs in results for o in outs)
    assert generated == n * tokens
    return generated / elapsed


def test_throughput_figure(cuda_bf16: LoadedModel, editor: HPREditor) -> None:
    """32 streams × 64 tokens, no edit vs the adapter's default edit, ABBA over 2 rounds. Prints tok/s."""
    configs = {"no edit": None, "default edit": editor.resolve(ADAPTER)}
    run_streams(cuda_bf16, editor, None, 4, 4)  # warm-up (kernels, allocator)
    figures: dict[str, list[float]] = {name: [] for name in configs}
    for order in (list(configs), list(reversed(configs))):
        for name in order:
            figures[name].append(run_streams(cuda_bf16, editor, configs[name], 32, 64))
    best = {name: max(values) for name, values in figures.items()}
    report = {
        "device": torch.cuda.get_device_name(),
        "streams": 32,
        "tokens": 64,
        "tok_s": figures,
        "edit_over_no_edit": best["default edit"] / best["no edit"],
    }
    print(f"\nGPU throughput: {json.dumps(report)}")
    out = os.environ.get("HPR_GPU_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
