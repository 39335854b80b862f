"""Mixed forwards: a decode step of the running streams and a prefill chunk of newcomers in one forward give what
the two give apart (tokens, logprobs, edit statistics, both scopes, padded prompts), fall back to running apart
when the mixed forward fails, and leave prompt logprobs to the separate prefill."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from hpr.editing import HPREditor
from hpr.model import LoadedModel
from server.engine import mixed
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.engine.conftest import collect, count_steps, joined, run

NEWCOMERS = ["Tell me about the sea and the wind", "A much longer prompt, so that the rows are padded a lot here"]


def _requests(loaded: LoadedModel, editor: HPREditor) -> tuple[GenerationRequest, list[GenerationRequest]]:
    tokenizer = loaded.tokenizer

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)

    running = GenerationRequest(
        "running", tokenizer.encode("Hi"), params(90),
        edit=editor.resolve("other", [1, 3], alpha=1.5, scope="generated"), return_stats=True,
    )  # fmt: skip
    edits = [editor.resolve("tiny", [0, 2], alpha=2.0), editor.resolve("other", [1, 3], alpha=1.5, scope="generated")]
    newcomers = [
        GenerationRequest(f"new{i}", tokenizer.encode(text), params(6), edit=edit, return_stats=True)
        for i, (text, edit) in enumerate(zip(NEWCOMERS, edits, strict=True))
    ]
    newcomers.append(GenerationRequest("plain", tokenizer.encode("Hello there"), params(6)))
    return running, newcomers


def _hold_until_queued(engine: Engine, count: int) -> None:
    """The engine thread waits after its decode steps until ``count`` requests are queued (5 s at most, once), so
    that newcomers sent one after another are taken together, as one prefill, however busy the machine is."""
    decode = engine.runner.decode
    armed = [True]

    def holding(batch: Any) -> Any:
        out = decode(batch)
        if armed[0]:
            deadline = time.monotonic() + 5
            while engine.queue_depth < count and time.monotonic() < deadline:
                time.sleep(0.001)
            armed[0] = False
        return out

    engine.runner.decode = holding  # type: ignore[method-assign]


def _serve(engine: Engine, running: GenerationRequest, newcomers: list[GenerationRequest]) -> list[Any]:
    """``running`` starts alone; once it has its first token, the newcomers arrive together."""
    _hold_until_queued(engine, len(newcomers))

    async def main() -> list[list[GenerationOutput]]:
        stream = engine.generate(running)
        first = [await anext(stream)]
        late = asyncio.gather(*(collect(engine, r) for r in newcomers))
        rest = [o async for o in stream]
        return [first + rest, *(await late)]

    engine.start()
    try:
        return run(main())
    finally:
        run(engine.stop(drain_timeout=10))


def _assert_same(apart: list[list[GenerationOutput]], together: list[list[GenerationOutput]]) -> None:
    for a, b in zip(apart, together, strict=True):
        assert joined(b) == joined(a)
        lp_a = [lp for o in a for lp in o.logprobs or []]
        lp_b = [lp for o in b for lp in o.logprobs or []]
        assert len(lp_a) == len(lp_b) > 0
        for x, y in zip(lp_a, lp_b, strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t[0] for t in x.top] == [t[0] for t in y.top]
        stats_a, stats_b = a[-1].edit_stats, b[-1].edit_stats
        assert (stats_a is None) == (stats_b is None)
        if stats_a is None or stats_b is None:
            continue
        assert set(stats_a.layers) == set(stats_b.layers)
        for layer, s in stats_a.layers.items():
            t = stats_b.layers[layer]
            assert (t.tokens, t.changed) == (s.tokens, s.changed)
            assert t.mean_amount == pytest.approx(s.mean_amount, abs=1e-5)


@pytest.mark.parametrize("chunk", [5, None])
def test_a_mixed_forward_gives_what_the_decode_step_and_the_chunk_give_apart(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, chunk: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    results, calls = {}, {}
    for mixing in (False, True):
        engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=chunk, mixed_prefill=mixing)
        calls[mixing] = []
        count_steps(engine, calls[mixing])
        results[mixing] = _serve(engine, running, newcomers)
    _assert_same(results[False], results[True])
    assert "failed" not in caplog.text  # no mixed forward fell back to running apart
    # Apart: chunks and decode steps alternate, no mixed forward. Mixed: every chunk shares a decode step.
    longest = max(len(r.prompt_ids) for r in newcomers)
    chunks = 1 if chunk is None else -(-longest // max(1, chunk // len(newcomers)))
    # (+ 1 chunk: the running request's own prefill, before there is a batch to mix with)
    assert calls[False].count("mixed") == 0 and calls[False].count("chunk") == chunks + 1
    assert calls[True].count("mixed") == chunks and calls[True].count("chunk") == 1
    # scope generated on the running row: its last prompt token and the 89 tokens fed back, mixed or not
    stats = results[True][0][-1].edit_stats
    assert stats is not None and all(s.tokens == 1 + 89 for s in stats.layers.values())
    first = results[True][1][-1].edit_stats  # scope all: every prompt token and the 5 fed back
    assert first is not None and all(s.tokens == len(newcomers[0].prompt_ids) + 5 for s in first.layers.values())


def test_a_failing_mixed_forward_rolls_back_and_runs_apart(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    apart = _serve(Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=False), running, newcomers)
    update = mixed.MixedCache.update
    failures: list[int] = []

    def failing_update(self: mixed.MixedCache, keys: Any, values: Any, layer_idx: int, *a: Any, **k: Any) -> Any:
        result = update(self, keys, values, layer_idx, *a, **k)  # layers 0 and 1 appended to both caches
        if layer_idx == 2 and len(failures) < 2:
            failures.append(layer_idx)
            raise RuntimeError("injected")
        return result

    monkeypatch.setattr(mixed.MixedCache, "update", failing_update)
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=True)
    calls: list[str] = []
    count_steps(engine, calls)
    together = _serve(engine, running, newcomers)
    assert len(failures) == 2 and calls.count("mixed") >= 3
    _assert_same(apart, together)


def test_prompt_logprobs_take_the_separate_prefill(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    scored = GenerationRequest(
        "scored", newcomers[0].prompt_ids, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=True)
    )
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=True)
    calls: list[str] = []
    count_steps(engine, calls)
    out = _serve(engine, running, [scored])
    assert calls.count("mixed") == 0 and calls.count("chunk") > 1
    prompt = [o.prompt_logprobs for o in out[1] if o.prompt_logprobs]
    assert len(prompt) == 1 and len(prompt[0]) == len(scored.prompt_ids)


def test_a_prefill_failing_after_its_last_mixed_chunk_is_redone_one_by_one(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor
) -> None:
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    apart = _serve(Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=False), running, newcomers)
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=True)
    calls: list[str] = []
    count_steps(engine, calls)
    done = engine.runner._prefill_done
    failures: list[int] = []

    def failing_done(job: Any, logits: Any, captured: Any) -> Any:
        if len(job.states) == len(newcomers) and not failures:  # the newcomers' job, once
            failures.append(len(job.states))
            raise RuntimeError("injected")
        return done(job, logits, captured)

    engine.runner._prefill_done = failing_done  # type: ignore[method-assign]
    together = _serve(engine, running, newcomers)
    assert failures == [len(newcomers)] and calls.count("mixed") > 1
    _assert_same(apart, together)  # edit statistics too: the chunks run before the failure are not counted twice


def test_rows_that_reach_their_edit_tokens_during_mixed_forwards_stop_being_edited(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor
) -> None:
    """The running row reaches its ``edit_tokens`` limit while newcomers' chunks share its decode steps: mixed or
    apart, the same tokens, and exactly the positions the limit allows are edited (the statistics count them)."""
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    running = replace(running, edit=replace(running.edit, tokens=3))  # scope generated: P − 1, then 2 fed back
    newcomers[0] = replace(newcomers[0], edit=replace(newcomers[0].edit, tokens=2))  # scope all: the prompt, 1 more
    results = {}
    for mixing in (False, True):
        engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=5, mixed_prefill=mixing)
        calls: list[str] = []
        count_steps(engine, calls)
        results[mixing] = _serve(engine, running, newcomers)
        # every chunk is mixed (or none is), and the running row crosses its limit during them
        assert calls.count("mixed") > 3 if mixing else calls.count("mixed") == 0
    _assert_same(results[False], results[True])
    stats = results[True][0][-1].edit_stats
    assert stats is not None and all(s.tokens == 3 for s in stats.layers.values())
    first = results[True][1][-1].edit_stats
    assert first is not None and all(s.tokens == len(newcomers[0].prompt_ids) + 1 for s in first.layers.values())


@pytest.mark.parametrize(("budget", "columns", "mixing"), [(9, 2, True), (9, 2, False), (2, 1, True)])
def test_a_step_budget_sizes_each_chunk_by_what_the_running_rows_leave(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, budget: int, columns: int, mixing: bool
) -> None:
    """``max_step_tokens``: 1 running row + 3 newcomers × c columns ≤ the budget (9 leaves 8 tokens: 2 columns
    each, where 9 // 3 would be 3), mixed or apart; at least one column each, even past the budget (2); the
    answers are those of whole-prompt prefills run apart."""
    running, newcomers = _requests(tiny_loaded, tiny_editor)
    apart = _serve(
        Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=None, mixed_prefill=False), running, newcomers
    )
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=256, mixed_prefill=mixing, max_step_tokens=budget)
    spans: list[tuple[int, int]] = []  # (start, stop) of each chunk of the three newcomers' prefill
    runner = engine.runner
    mixed_forward, chunk = runner._mixed_forward, runner._prefill_chunk

    def recording_mixed(batch: Any, job: Any) -> Any:
        assert len(batch) == 1 and len(job.states) == 3
        spans.append(job.next_span())
        return mixed_forward(batch, job)

    def recording_chunk(job: Any) -> Any:
        if len(job.states) == 3:  # not the running request's own prefill, before there is a batch
            spans.append(job.next_span())
        return chunk(job)

    runner._mixed_forward = recording_mixed  # type: ignore[method-assign]
    runner._prefill_chunk = recording_chunk  # type: ignore[method-assign]
    together = _serve(engine, running, newcomers)
    _assert_same(apart, together)
    longest = max(len(r.prompt_ids) for r in newcomers)
    assert spans == [(start, min(start + columns, longest)) for start in range(0, longest, columns)]
