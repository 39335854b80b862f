"""The engine on the real SmolLM2 (embedded default): batched requests with different edits match each alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.editing import HPREditor
from hpr.errors import ModelLoadError
from hpr.model import LoadedModel, load_model
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.engine.conftest import collect, joined, run
from tests.server.engine.test_exactness import assert_matches, reference


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    try:
        return load_model(device="cpu", dtype="float32")
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")


def random_smollm2_adapter(loaded: LoadedModel) -> HPRAdapter:
    torch.manual_seed(0)
    layers = list(range(loaded.num_layers))
    config = HPRConfig(
        base_model=loaded.model_id,
        hidden_size=loaded.hidden_size,
        num_layers=loaded.num_layers,
        layers=layers,
        selected_layers=[12, 13, 14, 15, 16],
    )
    adapter = HPRAdapter(config, name="random")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter.eval()


def test_smollm2_batched_edits_match_each_alone(smollm2: LoadedModel) -> None:
    editor = HPREditor(smollm2.model, {"random": random_smollm2_adapter(smollm2)})
    try:
        tokenizer = smollm2.tokenizer
        chats = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea."]
        prompts = [
            list(
                tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)["input_ids"]
            )
            for c in chats
        ]
        # alpha 0.5 on all 30 layers: at full strength this random adapter turns about half of all activations by
        # ~90° in every layer, and a probe decision on a token within float error of the hyperplane can then flip
        # between a batched and a single forward (any two fp32 summation orders) and move logits by ~1e-3.
        edits = [
            None,
            editor.resolve("random", "all", alpha=0.5),
            editor.resolve("random", "selected", scope="generated"),
        ]
        steps = 4

        async def main() -> list[list[GenerationOutput]]:
            engine = Engine(smollm2, editor)
            engine.start()
            try:
                requests = [
                    GenerationRequest(
                        f"r{i}", p, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, logprobs=3), edit=e
                    )
                    for i, (p, e) in enumerate(zip(prompts, edits, strict=True))
                ]
                return await asyncio.gather(*(collect(engine, r) for r in requests))
            finally:
                await engine.stop()

        results = run(main())
        for prompt, spec, outputs in zip(prompts, edits, results, strict=True):
            assert_matches(outputs, reference(smollm2, editor, prompt, spec, steps=steps))
            assert joined(outputs)[1]  # real text comes out
    finally:
        editor.detach()
