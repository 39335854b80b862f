"""The compiled decode step (issue 11 item 1): one graph, edits inline, the same outputs as the eager step.

The end-to-end exactness tests (tokens and logprobs against a plain HF forward, every edit case, rows joining a
running batch, scope, seeded sampling) run on both paths in ``test_exactness.py``. Here: the graph itself, the
edit statistics, and the cache columns it reads.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from hpr.editing import EditPlan, HPREditor
from hpr.model import LoadedModel
from server.engine.compiled import CompiledDecoder, _decode_step, inline_edits
from server.engine.engine import Engine
from server.engine.kv_cache import BatchKVCache, GrowableLayer
from server.engine.types import GenerationRequest, SamplingParams
from tests.server.engine.conftest import collect, run


def _inputs(loaded: LoadedModel, batch: int, capacity: int, length: int) -> dict[str, Any]:
    config = loaded.model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    keys = [torch.zeros(batch, heads, capacity, dim) for _ in range(config.num_hidden_layers)]
    values = [torch.zeros(batch, heads, capacity, dim) for _ in range(config.num_hidden_layers)]
    for k, v in zip(keys, values, strict=True):
        k[:, :, :length] = torch.randn(batch, heads, length, dim)
        v[:, :, :length] = torch.randn(batch, heads, length, dim)
    ids = torch.arange(5, 5 + batch)[:, None]
    return {
        "ids": ids,
        "positions": torch.full((batch, 1), length),
        "mask": (torch.arange(capacity) <= length)[None, None, None, :].expand(batch, 1, 1, capacity),
        "column": torch.tensor([length]),
        "keys": keys,
        "values": values,
    }


def test_one_graph_with_no_break_and_the_edit_hooks_inside(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    """Two adapters, a row without an edit, statistics on: dynamo captures the whole step as one graph. The
    editor's forward hooks are on the model's layers all the while (they see no plan and pass)."""
    specs = [tiny_editor.resolve("tiny", "all"), None, tiny_editor.resolve("other", "0-2", alpha=0.5)]
    plan = EditPlan(rows=specs, collect_stats=True)
    edits = inline_edits(plan, tiny_editor.registry, torch.device("cpu"))
    assert [(e.layer, e.rows[:, 0].tolist()) for e in edits] == [
        (0, [False, False, True]),  # "other", then "tiny": sorted by (layer, adapter)
        (0, [True, False, False]),
        (1, [False, False, True]),
        (1, [True, False, False]),
        (2, [False, False, True]),
        (2, [True, False, False]),
        (3, [True, False, False]),
    ]
    inputs = _inputs(tiny_loaded, batch=3, capacity=16, length=5)
    explained = torch._dynamo.explain(_decode_step)(
        tiny_loaded.model, *inputs.values(), edits, tiny_loaded.model.config.num_hidden_layers, True
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_step_equals_the_eager_forward_with_hooks(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    """The compiled step against the model's own eager forward (edits by the editor's hooks, the cache as a
    DynamicCache-like growable one): logits, the new cache column and the statistics."""
    specs = [tiny_editor.resolve("tiny", "all", alpha=2.0), None, tiny_editor.resolve("other", [1, 3])]
    num_layers = tiny_loaded.model.config.num_hidden_layers
    length, capacity = 5, 16
    inputs = _inputs(tiny_loaded, batch=3, capacity=capacity, length=length)
    cache = BatchKVCache(num_layers)
    for layer, k, v in zip(cache.growable_layers, inputs["keys"], inputs["values"], strict=True):
        layer.set_used(k[:, :, :length].clone(), v[:, :, :length].clone(), spare=1)
    eager_plan = EditPlan(rows=specs, collect_stats=True)
    with torch.inference_mode(), tiny_editor.apply(eager_plan):
        out = tiny_loaded.model(input_ids=inputs["ids"], position_ids=inputs["positions"], cache=cache, use_cache=True)
    want = out.logits[:, -1].float()
    plan = EditPlan(rows=specs, collect_stats=True)
    step = torch.compile(_decode_step)
    with torch.inference_mode():
        got, sums = step(
            tiny_loaded.model,
            *inputs.values(),
            inline_edits(plan, tiny_editor.registry, torch.device("cpu")),
            num_layers,
            True,
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(inputs["keys"], cache.growable_layers, strict=True):
        torch.testing.assert_close(mine[:, :, length], theirs.used()[0][:, :, length], atol=1e-6, rtol=1e-6)
        assert not mine[:, :, length + 1 :].any()  # nothing written past the new column
    assert sums is not None and eager_plan.sums is not None
    torch.testing.assert_close(sums, eager_plan.sums, atol=1e-5, rtol=1e-5)
    assert sums[1].abs().sum() == 0  # the row without an edit is never counted
    assert sums[0, :, 0].tolist() == [1.0] * num_layers  # alpha 2 on every layer: one token seen per layer
    assert sums[2, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]  # layers 1 and 3 only


def test_edit_stats_over_a_request_are_the_eager_ones(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    prompt = tiny_loaded.tokenizer.encode("The cat sat")

    def ask(compile_decode: bool) -> Any:
        async def main() -> Any:
            engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode)
            engine.start()
            try:
                request = GenerationRequest(
                    request_id="s",
                    prompt_ids=prompt,
                    sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                    edit=tiny_editor.resolve("tiny", "all"),
                    return_stats=True,
                )
                return (await collect(engine, request))[-1].edit_stats
            finally:
                await engine.stop()

        return run(main())

    eager, compiled = ask(False), ask(True)
    assert eager is not None and compiled is not None
    assert set(eager.layers) == set(compiled.layers) == {0, 1, 2, 3}
    for layer in eager.layers:
        assert compiled.layers[layer].tokens == eager.layers[layer].tokens == len(prompt) + 6 - 1  # + 5 decode steps
        assert compiled.layers[layer].changed == eager.layers[layer].changed
        assert compiled.layers[layer].amount_sum == pytest.approx(eager.layers[layer].amount_sum, abs=1e-5)
    assert sum(s.changed for s in eager.layers.values()) > 0  # the edit did something to compare


def test_columns_past_the_used_ones_are_zeros_after_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled step attends over the whole buffer, masked: a NaN left in an unused column would still reach
    the output (0 × NaN). So a grown buffer's new columns are zeros, whatever the allocator hands back."""
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, size, **_: torch.full(size, float("nan")))
    layer = GrowableLayer(roomy=False)  # as the compiled step's buffers: exactly the used rows
    k = torch.randn(2, 2, 3, 4)
    layer.update(k, k.clone())
    layer.reserve(200)
    assert layer.capacity >= 200 and layer.keys is not None and layer.keys.shape[0] == 2
    assert not layer.keys[:, :, 3:].isnan().any() and not layer.keys[:, :, 3:].any()
    assert not layer.values[:, :, 3:].any()
    torch.testing.assert_close(layer.keys[:, :, :3], k)


def test_a_model_it_cannot_compile_is_refused(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    model = tiny_loaded.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with pytest.raises(ValueError, match="cannot run model type 'llama' with attn_implementation 'eager'"):
            CompiledDecoder(model, tiny_editor.registry, 4)
    finally:
        model.config._attn_implementation = previous


def _count_compiled_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every decode step that goes through the compiled step."""
    calls: list[int] = []
    forward = CompiledDecoder.forward

    def counting(self: CompiledDecoder, cache: BatchKVCache, ids: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(ids.shape[0])
        return forward(self, cache, ids, *args)

    monkeypatch.setattr(CompiledDecoder, "forward", counting)
    return calls


def _two_requests(loaded: LoadedModel, editor: HPREditor, tokens: tuple[int, int]) -> None:
    async def main() -> None:
        engine = Engine(loaded, editor.registry, compile_decode=True)
        engine.start()
        try:
            requests = [
                GenerationRequest(
                    request_id=f"c{i}",
                    prompt_ids=[5 + i, 6, 7],
                    sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                )
                for i, n in enumerate(tokens)
            ]
            await asyncio.gather(*(collect(engine, r) for r in requests))
        finally:
            await engine.stop()

    run(main())


def test_the_engine_decodes_through_the_compiled_step(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_compiled_steps(monkeypatch)
    _two_requests(tiny_loaded, tiny_editor, (4, 4))
    assert calls == [2, 2, 2]  # every decode step of both (the first token comes from the prefill)


def test_frozen_weights_of_another_adapter_are_not_reused(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    """With inductor's freezing (what the engine thread compiles with on a CPU) an adapter's weights are constants
    of the graph: a batch with another adapter at the same layers must not run on the first one's weights."""
    num_layers = tiny_loaded.model.config.num_hidden_layers
    previous = torch._inductor.config.freezing
    torch._inductor.config.freezing = True  # this thread's setting
    try:
        step = torch.compile(_decode_step)
        for adapter in ("tiny", "other"):  # same layers, same shapes, different weights
            plan = EditPlan(rows=[tiny_editor.resolve(adapter, "all", alpha=2.0)] * 2)
            edits = inline_edits(plan, tiny_editor.registry, torch.device("cpu"))
            fresh = [_inputs(tiny_loaded, batch=2, capacity=16, length=5) for _ in range(2)]
            with torch.inference_mode():
                got, _ = step(tiny_loaded.model, *fresh[0].values(), edits, num_layers, False)
                want, _ = _decode_step(tiny_loaded.model, *fresh[1].values(), edits, num_layers, False)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch._inductor.config.freezing = previous


def test_past_max_graphs_steps_run_eagerly_and_compile_nothing(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each frozen graph holds a packed copy of the weights, so the engine compiles at most ``compile_max_graphs``:
    with 1, a second edit set's steps run eagerly (the step returns None), compile no graph, and give the same
    tokens and logprobs as an eager engine."""
    paths: list[str] = []
    forward = CompiledDecoder.forward

    def recording(self: CompiledDecoder, *args: Any) -> Any:
        logits = forward(self, *args)
        paths.append("eager" if logits is None else "compiled")
        return logits

    monkeypatch.setattr(CompiledDecoder, "forward", recording)
    edits = {"tiny": tiny_editor.resolve("tiny", "all", alpha=2.0), "none": None}

    def ask(compiled: bool) -> tuple[dict[str, Any], int]:
        async def main() -> tuple[dict[str, Any], int]:
            engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compiled, compile_max_graphs=1)
            engine.start()
            try:
                out: dict[str, Any] = {}
                graphs = 0
                for name, edit in edits.items():
                    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                    request = GenerationRequest(
                        request_id=name,
                        prompt_ids=[5, 6, 7],
                        sampling=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=0),
                        edit=edit,
                    )
                    outputs = await collect(engine, request)
                    out[name] = (
                        [t for o in outputs for t in o.token_ids],
                        [lp.logprob for o in outputs for lp in o.logprobs or []],
                    )
                new_graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - graphs
                if compiled:
                    assert engine.runner.compiled is not None and len(engine.runner.compiled.graphs) == 1
                return out, new_graphs
            finally:
                await engine.stop()

        return run(main())

    (eager, _), (compiled, graphs_for_second) = ask(False), ask(True)
    assert paths == ["compiled"] * 4 + ["eager"] * 4  # 4 decode steps each (the first token is the prefill's)
    assert graphs_for_second == 0
    for name in edits:
        assert compiled[name][0] == eager[name][0] and len(eager[name][0]) == 5
        assert compiled[name][1] == pytest.approx(eager[name][1], abs=1e-4)
    assert eager["tiny"][0] != eager["none"][0] or eager["tiny"][1] != eager["none"][1]  # two different steps


def _record_paths(engine: Engine, paths: list[str]) -> None:
    """Append, per decode step of ``engine``'s compiled decoder, whether it ran the graph or fell back to eager."""
    compiled = engine.runner.compiled
    if compiled is None:
        return
    forward = compiled.forward

    def recording(*args: Any) -> Any:
        logits = forward(*args)
        paths.append("eager" if logits is None else "compiled")
        return logits

    compiled.forward = recording  # type: ignore[method-assign]


def _greedy(
    loaded: LoadedModel, editor: HPREditor, edit: Any, tokens: int, paths: list[str], **engine_kwargs: Any
) -> tuple[list[int], list[float]]:
    """One greedy request of ``tokens`` tokens on a fresh engine: its tokens and logprobs (its compiled decoder's
    steps recorded in ``paths``)."""

    async def main() -> tuple[list[int], list[float]]:
        engine = Engine(loaded, editor.registry, **engine_kwargs)
        _record_paths(engine, paths)
        engine.start()
        try:
            request = GenerationRequest(
                request_id="q",
                prompt_ids=[5, 6, 7],
                sampling=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0),
                edit=edit,
            )
            outputs = await collect(engine, request)
            logprobs = [lp.logprob for o in outputs for lp in o.logprobs or []]
            return [t for o in outputs for t in o.token_ids], logprobs
        finally:
            await engine.stop()

    return run(main())


def test_int8_weights_compile_and_give_the_eager_int8_outputs() -> None:
    """``--compile-decode`` with ``--quantization int8`` (torchao's weight-only int8 tensors inside the frozen
    graph): every decode step goes through the compiled graph, with the edit, and gives the eager int8 engine's
    tokens and logprobs."""
    pytest.importorskip("torchao")
    from hpr.model import quantize_weights
    from tests.conftest import make_random_adapter, make_tiny_llama
    from tests.server.conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(seed=0, vocab=len(tokenizer))
    assert quantize_weights(model, "int8") == "int8"
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"  # a torchao tensor now
    loaded = LoadedModel(model, tokenizer, "tiny-int8", "memory", torch.device("cpu"), torch.float32, "int8")
    editor = HPREditor(model, {"tiny": make_random_adapter(seed=0)})
    edit = editor.resolve("tiny", "all", alpha=2.0)
    paths: list[str] = []
    eager = _greedy(loaded, editor, edit, 6, paths)
    compiled = _greedy(loaded, editor, edit, 6, paths, compile_decode=True)
    assert paths == ["compiled"] * 5
    assert compiled[0] == eager[0] and len(eager[0]) == 6
    assert compiled[1] == pytest.approx(eager[1], abs=1e-4)


def test_autotune_compiles_in_inductors_autotune_mode_and_gives_the_eager_outputs(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile_autotune``: the step is compiled with ``mode="max-autotune-no-cudagraphs"`` and answers as the eager
    engine does."""
    modes: list[str | None] = []
    real = torch.compile

    def recording(fn: Any, **kwargs: Any) -> Any:
        modes.append(kwargs.get("mode"))
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    edit = tiny_editor.resolve("tiny", "all", alpha=2.0)
    paths: list[str] = []
    eager = _greedy(tiny_loaded, tiny_editor, edit, 5, paths)
    tuned = _greedy(tiny_loaded, tiny_editor, edit, 5, paths, compile_decode=True, compile_autotune=True)
    assert modes == ["max-autotune-no-cudagraphs"] and paths == ["compiled"] * 4
    assert tuned[0] == eager[0] and len(eager[0]) == 5
    assert tuned[1] == pytest.approx(eager[1], abs=1e-4)
