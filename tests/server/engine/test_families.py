"""The family matrix (issue 28): every supported family, and sliding-window variants, served exactly by the engine.

For each tiny model of :mod:`tests.families`, greedy decoding through the engine equals two references that share
no code with it: transformers' ``generate`` (unedited rows) and a plain full-sequence forward with the in-process
:class:`HPREditor` (every row, edited or not). The engine runs each request alone, all together in one padded batch
(prompts of different lengths, longer than the window, decoding past it), in chunked prefill, and joining a running
batch. Edit statistics equal those of the same request alone.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import replace
from typing import Any

import pytest
import torch

from hpr.editing import EditSpec, HPREditor
from hpr.errors import ModelLoadError
from hpr.model import LoadedModel, quantize_weights
from server.engine.engine import Engine
from server.engine.mixed import can_mix
from server.engine.support import CONV1D_MODEL_TYPES
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.conftest import make_random_adapter
from tests.families import FAMILIES, HIDDEN, LAYERS, WINDOW, WINDOWED, make_family_model
from tests.server.engine.conftest import StepSizes, collect, joined, run
from tests.server.engine.test_exactness import reference

STEPS = 12  # past the window for every prompt below
TEXTS = ["Hi", "The cat sat on the mat.", "Once upon a time, far away", "1 2 3"]  # 2-26 tokens
TOL = 1e-3  # fp32, logprobs of wide random weights (|logprob| up to ~10)
CASES = [(family, None) for family in FAMILIES] + [(family, WINDOW) for family in WINDOWED]


@pytest.fixture(scope="module", params=CASES, ids=[f + (f"-window{w}" if w else "") for f, w in CASES])
def family(request: pytest.FixtureRequest) -> tuple[LoadedModel, HPREditor]:
    name, window = request.param
    loaded = make_family_model(name, window)
    adapter = make_random_adapter(hidden=HIDDEN, layers=LAYERS, seed=3)
    return loaded, HPREditor(loaded.model, {"tiny": adapter})


def _requests(loaded: LoadedModel, editor: HPREditor) -> list[GenerationRequest]:
    edits: list[EditSpec | None] = [
        None,
        editor.resolve("tiny", "all"),
        None,
        editor.resolve("tiny", [1, 3], alpha=2.0, scope="generated"),
    ]
    sampling = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, logprobs=3)
    return [
        GenerationRequest(f"r{i}", loaded.tokenizer.encode(text), sampling, edit=edit, return_stats=edit is not None)
        for i, (text, edit) in enumerate(zip(TEXTS, edits, strict=True))
    ]


def _hf_generate(loaded: LoadedModel, prompt: list[int]) -> list[int]:
    """Greedy ``generate``, up to ``STEPS`` tokens or the end-of-sequence token (which it then includes)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False)
    return [int(t) for t in out[0, len(prompt) :]]


async def _alone(engine: Engine, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    return [await collect(engine, r) for r in requests]


async def _together(engine: Engine, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    return list(await asyncio.gather(*(collect(engine, r) for r in requests)))


class JoinGate(StepSizes):
    """Holds the engine thread at each decode step until ``open``: the newcomers are queued while the first rows
    run, so they join a running batch however loaded the machine is (else the first rows could finish before the
    event loop submits them)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()

    def on_step(self, batch_size: int) -> None:
        super().on_step(batch_size)
        self.open.wait(60)


async def _joining(engine: Engine, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    """The first two start decoding, then the other two join their batch."""
    gate = engine.observer
    assert isinstance(gate, JoinGate)
    first = [engine.generate(r) for r in requests[:2]]
    # both submitted in one tick (prefilled together); the engine then waits at its first decode step
    heads = [[head] for head in await asyncio.gather(*(anext(stream) for stream in first))]

    async def rest(stream: Any, head: list[GenerationOutput]) -> list[GenerationOutput]:
        return head + [o async for o in stream]

    later = [asyncio.ensure_future(collect(engine, r)) for r in requests[2:]]
    while engine.queue_depth < len(later):  # submitted once each task first runs
        await asyncio.sleep(0.01)
    gate.open.set()
    firsts = await asyncio.gather(*(rest(s, h) for s, h in zip(first, heads, strict=True)))
    return [*firsts, *(await asyncio.gather(*later))]


MODES = {
    "alone": (_alone, {}),
    "together": (_together, {}),
    "chunked": (_together, {"prefill_chunk": 10}),
    "joining": (_joining, {}),
    "mixed": (_joining, {"mixed_prefill": True, "prefill_chunk": 6}),
    "compiled": (_together, {"compile_decode": True}),  # the families it runs (server.engine.mixed); ~20 s each
}


@pytest.fixture(scope="module")
def references(family: tuple[LoadedModel, HPREditor]) -> list[tuple[list[int], list[torch.Tensor]]]:
    loaded, editor = family
    return [reference(loaded, editor, r.prompt_ids, r.edit, STEPS) for r in _requests(loaded, editor)]


_SERVED: dict[tuple[str, str], tuple[list[list[GenerationOutput]], int]] = {}


def served(family: tuple[LoadedModel, HPREditor], mode: str) -> tuple[list[list[GenerationOutput]], int]:
    """The outputs of ``mode`` and its largest step, from one engine (run once per family and mode)."""
    loaded, editor = family
    key = (loaded.model_id, mode)
    if key not in _SERVED:
        how, kwargs = MODES[mode]
        observer = JoinGate() if how is _joining else StepSizes()

        async def main() -> list[list[GenerationOutput]]:
            engine = Engine(loaded, editor.registry, max_batch_size=8, observer=observer, **kwargs)
            engine.start()
            try:
                return await how(engine, _requests(loaded, editor))
            finally:
                await engine.stop()

        _SERVED[key] = (run(main()), max(observer.sizes))
    return _SERVED[key]


def test_the_reference_is_hf_generate(
    family: tuple[LoadedModel, HPREditor], references: list[tuple[list[int], list[torch.Tensor]]]
) -> None:
    """The full-sequence reference equals transformers' own ``generate`` for the unedited rows."""
    loaded, editor = family
    for request, (tokens, _) in zip(_requests(loaded, editor), references, strict=True):
        if request.edit is None:
            generated = _hf_generate(loaded, request.prompt_ids)
            assert generated[-1] == loaded.tokenizer.eos_token_id or len(generated) == STEPS
            assert tokens[: len(generated)] == generated


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_the_reference(
    family: tuple[LoadedModel, HPREditor],
    references: list[tuple[list[int], list[torch.Tensor]]],
    mode: str,
) -> None:
    if mode == "compiled" and not can_mix(family[0].model):
        with pytest.raises(ValueError, match=f"cannot run model type '{family[0].model.config.model_type}'"):
            Engine(family[0], family[1].registry, compile_decode=True)
        return
    outputs, largest_step = served(family, mode)
    if mode in ("joining", "mixed"):
        assert largest_step >= 3  # a newcomer decoded in the running batch
    else:
        assert largest_step == (1 if mode == "alone" else 4)
    for got, (tokens, logprobs) in zip(outputs, references, strict=True):
        assert joined(got)[0] == tokens
        values = [lp for o in got for lp in (o.logprobs or [])]
        assert max(abs(v.logprob - float(want[v.token_id])) for v, want in zip(values, logprobs, strict=True)) < TOL


def test_edit_stats_equal_the_request_alone(family: tuple[LoadedModel, HPREditor]) -> None:
    loaded, editor = family
    requests = _requests(loaded, editor)
    alone = served(family, "alone")[0]
    for mode in ("together", "chunked", "joining"):
        for request, got, want in zip(requests, served(family, mode)[0], alone, strict=True):
            if request.edit is None:
                assert got[-1].edit_stats is None
                continue
            got_stats, want_stats = got[-1].edit_stats, want[-1].edit_stats
            assert got_stats is not None and want_stats is not None
            assert set(got_stats.layers) == set(request.edit.layers)
            for layer, stats in want_stats.layers.items():
                prompt = len(request.prompt_ids)
                expected_tokens = prompt + STEPS - 1 if request.edit.scope == "all" else 1 + STEPS - 1
                assert stats.tokens == expected_tokens
                assert got_stats.layers[layer].tokens == stats.tokens
                assert got_stats.layers[layer].changed == stats.changed
                assert abs(got_stats.layers[layer].amount_sum - stats.amount_sum) < 1e-3


def test_int8_weights_serve_as_the_int8_model_alone(family: tuple[LoadedModel, HPREditor]) -> None:
    """``--quantization int8``: the batch equals the same quantized model's full-sequence reference; a family
    without nn.Linear layers (gpt2's Conv1D) is refused, never left unquantized in silence."""
    pytest.importorskip("torchao")
    loaded, editor = family
    model = copy.deepcopy(loaded.model)
    if loaded.model.config.model_type in CONV1D_MODEL_TYPES:
        with pytest.raises(ModelLoadError, match=r"no nn\.Linear layers"):
            quantize_weights(model, "int8")
        return
    assert quantize_weights(model, "int8") == "int8"
    int8 = replace(loaded, model=model, quantization="int8")
    int8_editor = HPREditor(model, {"tiny": editor.registry.get("tiny")})
    requests = _requests(int8, int8_editor)
    expected = [reference(int8, int8_editor, r.prompt_ids, r.edit, STEPS)[0] for r in requests]
    assert expected != [reference(loaded, editor, r.prompt_ids, r.edit, STEPS)[0] for r in requests]  # int8 did act

    async def main() -> list[list[GenerationOutput]]:
        engine = Engine(int8, int8_editor.registry, max_batch_size=8)
        engine.start()
        try:
            return await _together(engine, requests)
        finally:
            await engine.stop()

    assert [joined(out)[0] for out in run(main())] == expected
