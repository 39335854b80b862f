"""The engine on the real SmolLM2 (embedded default): batched requests with different edits match each alone.

At the adapter's default strength (alpha 2): the exactness guarantee of docs/server.md ("Exactness"). Every test
also checks that the edits change the output (against the unedited model on the same prompt) and that the
requests really shared forward passes (the engine's step observer saw them all in one batch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.editing import EditSpec, HPREditor
from hpr.errors import ModelLoadError
from hpr.model import LoadedModel, load_model
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.engine.conftest import StepSizes, collect, joined, run
from tests.server.engine.test_exactness import assert_matches, reference

TRAINED = Path(__file__).resolve().parents[3] / "runs" / "truthfulqa" / "checkpoint"
CHATS = [
    "What is the capital of France?",
    "Name a colour.",
    "Write a haiku about the sea.",
    "What happens if you crack your knuckles a lot?",
]
STEPS = 6
EXACT_TOL = 2e-4  # docs/server.md "Exactness": same greedy tokens, logprobs within 2e-4 at the default alpha


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    try:
        return load_model(device="cpu", dtype="float32")
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")


def random_smollm2_adapter(loaded: LoadedModel) -> HPRAdapter:
    """Random weights of SmolLM2's shape; default alpha 2 on layers 16, 17, 19, as the trained checkpoint has."""
    torch.manual_seed(0)
    layers = list(range(loaded.num_layers))
    config = HPRConfig(
        base_model=loaded.model_id,
        hidden_size=loaded.hidden_size,
        num_layers=loaded.num_layers,
        layers=layers,
        selected_layers=[16, 17, 19],
        default_alpha=2.0,
    )
    adapter = HPRAdapter(config, name="random")
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.05)
    return adapter.eval()


def smollm2_adapter(loaded: LoadedModel, kind: str) -> HPRAdapter:
    if kind == "random":
        return random_smollm2_adapter(loaded)
    if not (TRAINED / "hpr_config.json").is_file():
        pytest.skip(f"no trained checkpoint at {TRAINED} (make serve trains it)")
    return HPRAdapter.load(TRAINED, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)


def chat_prompt(loaded: LoadedModel, text: str) -> list[int]:
    enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(enc["input_ids"])


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_smollm2_batched_edits_at_the_default_alpha_match_each_alone(smollm2: LoadedModel, kind: str) -> None:
    adapter = smollm2_adapter(smollm2, kind)
    # The guarantee (docs/server.md "Exactness") is stated at alpha 2, stronger than the trained checkpoint's
    # served default (alpha 0.5, scope generated, the first 2 tokens, chosen by the generation-mode eval), so alpha
    # 2 is asked for.
    served = (2.0, "all", None) if kind == "random" else (0.5, "generated", 2)
    assert (adapter.config.default_alpha, adapter.config.default_scope, adapter.config.default_edit_tokens) == served
    editor = HPREditor(smollm2.model, {"a": adapter})
    try:
        prompts = [chat_prompt(smollm2, c) for c in CHATS]
        edits: list[EditSpec | None] = [
            None,
            editor.resolve("a", alpha=2.0, scope="all"),  # the adapter's selected layers
            editor.resolve("a", "all", alpha=0.5, scope="all"),
            editor.resolve("a", alpha=2.0, scope="generated"),
        ]
        assert [e.alpha for e in edits if e is not None] == [2.0, 0.5, 2.0]
        observer = StepSizes()

        async def main() -> list[list[GenerationOutput]]:
            engine = Engine(smollm2, editor.registry, observer=observer)
            engine.start()
            try:
                sampling = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=3)
                requests = [
                    GenerationRequest(f"r{i}", p, sampling, edit=e)
                    for i, (p, e) in enumerate(zip(prompts, edits, strict=True))
                ]
                return await asyncio.gather(*(collect(engine, r) for r in requests))
            finally:
                await engine.stop()

        results = run(main())
        assert max(observer.sizes) == len(prompts)  # all four rows in one forward pass at some step
        for prompt, spec, outputs in zip(prompts, edits, results, strict=True):
            assert_matches(outputs, reference(smollm2, editor, prompt, spec, steps=STEPS), EXACT_TOL)
            assert joined(outputs)[1]  # real text comes out
            if spec is None:
                continue
            unedited_tokens, unedited_lps = reference(smollm2, editor, prompt, None, steps=STEPS)
            tokens = joined(outputs)[0]
            first = outputs[0].logprobs
            assert first is not None
            moved = abs(first[0].logprob - float(unedited_lps[0][first[0].token_id]))
            assert tokens != unedited_tokens or moved > 1e-3, f"the edit {spec} changed nothing"
    finally:
        editor.detach()
