"""Batched serving gives every request exactly what it would get alone (issue 3 §8 exactness)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from hpr.editing import EditPlan, EditSpec, HPREditor
from hpr.model import LoadedModel
from server.engine.engine import Engine
from server.engine.kv_cache import BatchKVCache, GrowableLayer
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.engine.conftest import StepSizes, collect, joined, run

STEPS = 8
TOL = 1e-4


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compile_decode(request: pytest.FixtureRequest) -> bool:
    """Every test here runs on the eager decode step and on the compiled one (issue 11 item 1)."""
    return bool(request.param)


def _greedy_loop(
    loaded: LoadedModel, editor: HPREditor, prompt: list[int], plan: Callable[[int], EditPlan | None], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with a plain HF forward over the whole sequence each step (no cache, no batch); ``plan``
    gives the edit plan for a sequence of that many tokens."""
    ids = list(prompt)
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    with torch.inference_mode():
        for _ in range(steps):
            with editor.apply(plan(len(ids))):
                logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(lp)
            ids.append(token)
    return tokens, logprobs


def reference(
    loaded: LoadedModel, editor: HPREditor, prompt: list[int], spec: EditSpec | None, steps: int = STEPS
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding, the edit's positions chosen by the plan's prompt lengths (as the engine sets them)."""
    return _greedy_loop(
        loaded,
        editor,
        prompt,
        lambda _n: EditPlan(rows=[spec], prompt_lengths=[len(prompt)]) if spec is not None else None,
        steps,
    )


def greedy(request_id: str, prompt: list[int], edit: EditSpec | None, steps: int = STEPS) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=5)
    return GenerationRequest(request_id=request_id, prompt_ids=prompt, sampling=sampling, edit=edit)


def assert_matches(
    outputs: list[GenerationOutput], expected: tuple[list[int], list[torch.Tensor]], tol: float = TOL
) -> None:
    tokens, _ = joined(outputs)
    want_tokens, want_lps = expected
    assert tokens == want_tokens
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    assert len(logprobs) == len(want_lps)
    for got, want in zip(logprobs, want_lps, strict=True):
        assert abs(got.logprob - float(want[got.token_id])) < tol
        for token_id, _text, value in got.top:
            assert abs(value - float(want[token_id])) < tol


def edit_cases(editor: HPREditor) -> list[EditSpec | None]:
    return [
        None,
        editor.resolve("tiny", "selected"),
        editor.resolve("tiny", "all"),
        editor.resolve("tiny", [1, 3]),
        editor.resolve("tiny", "all", alpha=0.5),
        editor.resolve("tiny", "all", alpha=2.0),
        editor.resolve("tiny", "all", scope="generated"),
        editor.resolve("other", "0-2"),
    ]


def prompts_for(loaded: LoadedModel, n: int) -> list[list[int]]:
    texts = ["Hi", "The cat sat on the mat.", "x", "Once upon a time, in a land far away", "1 2 3 4"]
    return [loaded.tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


def test_concurrent_requests_with_different_edits_match_each_alone(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    cases = edit_cases(tiny_editor)
    prompts = prompts_for(tiny_loaded, len(cases))
    observer = StepSizes()

    async def main() -> list[list[GenerationOutput]]:
        engine = Engine(
            tiny_loaded, tiny_editor.registry, compile_decode=compile_decode, max_batch_size=16, observer=observer
        )
        engine.start()
        try:
            return await asyncio.gather(
                *(collect(engine, greedy(f"r{i}", p, e)) for i, (p, e) in enumerate(zip(prompts, cases, strict=True)))
            )
        finally:
            await engine.stop()

    results = run(main())
    assert max(observer.sizes) == len(cases)  # every request in one forward pass at some step
    for prompt, spec, outputs in zip(prompts, cases, results, strict=True):
        expected = reference(tiny_loaded, tiny_editor, prompt, spec)
        assert_matches(outputs, expected)
        if spec is not None:  # the edit changes the output of this prompt
            unedited = reference(tiny_loaded, tiny_editor, prompt, None)
            assert expected[0] != unedited[0] or float((expected[1][0] - unedited[1][0]).abs().max()) > 1e-3, spec


def serve_staggered(
    loaded: LoadedModel,
    editor: HPREditor,
    compile_decode: bool,
    prompts: list[list[int]],
    cases: list[EditSpec | None],
    steps: Callable[[int], int],
    pause: Callable[[int], float | None],
) -> list[list[GenerationOutput]]:
    """Greedy request ``i`` (``steps(i)`` tokens) sent to one engine, then ``pause(i)`` seconds before the next
    (None: sent right after, without yielding to the engine)."""

    async def main() -> list[list[GenerationOutput]]:
        engine = Engine(loaded, editor.registry, compile_decode=compile_decode, max_batch_size=16)
        engine.start()
        try:
            tasks = []
            for i, (prompt, spec) in enumerate(zip(prompts, cases, strict=True)):
                tasks.append(asyncio.create_task(collect(engine, greedy(f"r{i}", prompt, spec, steps=steps(i)))))
                wait = pause(i)
                if wait is not None:
                    await asyncio.sleep(wait)
            return await asyncio.gather(*tasks)
        finally:
            await engine.stop()

    return run(main())


def test_requests_joining_a_running_batch_match_each_alone(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    """Later arrivals are prefilled and concatenated into a batch with a longer (or shorter) cache."""
    cases = edit_cases(tiny_editor)
    prompts = prompts_for(tiny_loaded, len(cases))

    # join at different steps
    results = serve_staggered(
        tiny_loaded, tiny_editor, compile_decode, prompts, cases, lambda i: STEPS + i, lambda i: 0.01 * (i % 3)
    )
    for i, (prompt, spec, outputs) in enumerate(zip(prompts, cases, results, strict=True)):
        assert_matches(outputs, reference(tiny_loaded, tiny_editor, prompt, spec, steps=STEPS + i))


def test_layers_none_equals_the_base_model(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    prompt = tiny_loaded.tokenizer.encode("The cat sat")
    none_spec = tiny_editor.resolve("tiny", "none")
    assert none_spec.is_noop

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode)
        engine.start()
        try:
            return await asyncio.gather(
                collect(engine, greedy("none", prompt, none_spec)),
                collect(engine, greedy("edited", prompt, tiny_editor.resolve("tiny", "all"))),
            )
        finally:
            await engine.stop()

    with_none, edited = run(main())
    base = reference(tiny_loaded, tiny_editor, prompt, None)
    assert_matches(with_none, base)
    assert joined(edited)[0] != base[0] or any(
        abs(a.logprob - float(b[a.token_id])) > 1e-3
        for a, b in zip([lp for o in edited for lp in o.logprobs or []], base[1], strict=True)
    )


def test_scope_generated_differs_from_all_only_where_it_should(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    """Scope ``generated`` leaves the prompt (but its last token) unedited: its prompt logprobs equal the base
    model's; scope ``all`` changes them; both change the generated tokens' distribution."""
    prompt = tiny_loaded.tokenizer.encode("Once upon a time")

    def scoring(request_id: str, spec: EditSpec | None) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=True)
        return GenerationRequest(request_id, prompt, sampling, edit=spec)

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput], list[GenerationOutput]]:
        engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode)
        engine.start()
        try:
            return await asyncio.gather(
                collect(engine, scoring("base", None)),
                collect(engine, scoring("gen", tiny_editor.resolve("tiny", "all", scope="generated"))),
                collect(engine, scoring("all", tiny_editor.resolve("tiny", "all", scope="all"))),
            )
        finally:
            await engine.stop()

    base, generated, everywhere = run(main())

    def prompt_lps(outputs: list[GenerationOutput]) -> list[float]:
        lps = outputs[0].prompt_logprobs
        assert lps is not None and lps[0] is None and len(lps) == len(prompt)
        return [lp.logprob for lp in lps[1:] if lp is not None]

    assert max(abs(a - b) for a, b in zip(prompt_lps(base), prompt_lps(generated), strict=True)) < TOL
    assert max(abs(a - b) for a, b in zip(prompt_lps(base), prompt_lps(everywhere), strict=True)) > 1e-3

    def first_token_lp(outputs: list[GenerationOutput]) -> float:
        lps = outputs[0].logprobs
        assert lps
        return lps[0].logprob

    assert abs(first_token_lp(base) - first_token_lp(generated)) > 1e-4
    assert abs(first_token_lp(generated) - first_token_lp(everywhere)) > 1e-4


def test_seeded_sampling_gives_the_same_text_alone_and_in_a_batch(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    prompt = tiny_loaded.tokenizer.encode("Tell me a story")

    def sampled(request_id: str, seed: int, **kwargs: float) -> GenerationRequest:
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True, **kwargs)  # type: ignore[arg-type]
        return GenerationRequest(request_id, prompt, params, edit=tiny_editor.resolve("tiny", "selected"))

    async def alone(request: GenerationRequest) -> str:
        engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode)
        engine.start()
        try:
            return joined(await collect(engine, request))[1]
        finally:
            await engine.stop()

    async def batched() -> list[str]:
        engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode)
        engine.start()
        try:
            requests = [sampled("a", 7), sampled("b", 7, top_p=0.9), sampled("c", 8, top_k=5)]
            noise = [sampled(f"n{i}", i, min_p=0.05) for i in range(4)]
            outs = await asyncio.gather(*(collect(engine, r) for r in [*noise[:2], *requests, *noise[2:]]))
            return [joined(o)[1] for o in outs[2:5]]
        finally:
            await engine.stop()

    in_batch = run(batched())
    assert in_batch[0] == run(alone(sampled("a", 7)))
    assert in_batch[1] == run(alone(sampled("b", 7, top_p=0.9)))
    assert in_batch[2] == run(alone(sampled("c", 8, top_k=5)))
    assert run(alone(sampled("d", 9))) != in_batch[0]  # another seed, another text


def masked_reference(
    loaded: LoadedModel, editor: HPREditor, prompt: list[int], spec: EditSpec, steps: int = STEPS
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding as :func:`reference`, for a spec with a token limit: the same edit without the limit,
    applied at positions written out here by hand (the plan's ``valid`` mask), not by the spec's own rule. The
    first ``tokens`` generated tokens come from edited states: inputs ``P − 1 … P − 2 + tokens``."""
    assert spec.tokens is not None
    first = 0 if spec.scope == "all" else len(prompt) - 1
    end = len(prompt) - 1 + spec.tokens
    whole = replace(spec, scope="all", tokens=None)

    def plan(n: int) -> EditPlan:
        return EditPlan(rows=[whole], valid=torch.tensor([[first <= p < end for p in range(n)]]))

    return _greedy_loop(loaded, editor, prompt, plan, steps)


def test_edit_tokens_edits_the_first_tokens_only_alone_batched_and_joining(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool
) -> None:
    """A request with ``edit_tokens`` N gets the full edit's first N tokens, then tokens generated from unedited
    states, in a batch with unlimited and unedited rows; rows cross their limits at different steps (the decode
    plan is rebuilt) and join a running batch late."""
    limited = [
        tiny_editor.resolve("tiny", "all", scope="generated", tokens=1),
        tiny_editor.resolve("tiny", [1, 3], alpha=2.0, tokens=3),
        tiny_editor.resolve("other", "0-2", scope="generated", tokens=5),
    ]
    cases: list[EditSpec | None] = [*limited, tiny_editor.resolve("tiny", "all", scope="generated"), None]
    prompts = prompts_for(tiny_loaded, len(cases))
    steps = STEPS + 2

    # the first two start together, the rest join a running batch
    results = serve_staggered(
        tiny_loaded, tiny_editor, compile_decode, prompts, cases, lambda _i: steps, lambda i: 0.02 if i == 1 else None
    )
    for prompt, spec, outputs in zip(prompts, cases, results, strict=True):
        if spec is None or spec.tokens is None:
            assert_matches(outputs, reference(tiny_loaded, tiny_editor, prompt, spec, steps=steps))
            continue
        expected = masked_reference(tiny_loaded, tiny_editor, prompt, spec, steps=steps)
        assert_matches(outputs, expected)
        # The limit matters: the first N distributions are the unlimited edit's, a later one is not.
        unlimited = reference(tiny_loaded, tiny_editor, prompt, replace(spec, tokens=None), steps=steps)
        n = spec.tokens
        assert expected[0][:n] == unlimited[0][:n]
        assert all(float((a - b).abs().max()) < TOL for a, b in zip(expected[1][:n], unlimited[1][:n], strict=True))
        assert max(float((a - b).abs().max()) for a, b in zip(expected[1][n:], unlimited[1][n:], strict=True)) > 1e-3


Wave = list[tuple[list[int], EditSpec | None, int]]  # greedy requests: prompt, edit, tokens


def serve_in_two_waves(
    loaded: LoadedModel,
    editor: HPREditor,
    compile_decode: bool,
    first: Wave,
    later: Wave,
    ready: Callable[[list[asyncio.Task[list[GenerationOutput]]], asyncio.Event], Awaitable[None]],
) -> None:
    """Requests ``first`` sent to one engine; once ``ready(their tasks, an event set when one of them has two
    tokens)`` returns, ``later`` too. Every request must get what it gets alone."""

    async def main() -> list[list[GenerationOutput]]:
        engine = Engine(loaded, editor.registry, compile_decode=compile_decode, max_batch_size=16)
        engine.start()
        started = asyncio.Event()

        async def watched(request: GenerationRequest) -> list[GenerationOutput]:
            outputs = []
            async for output in engine.generate(request):
                outputs.append(output)
                if len(outputs) >= 2:
                    started.set()
            return outputs

        try:
            tasks = [asyncio.create_task(watched(greedy(f"r{i}", p, e, steps=n))) for i, (p, e, n) in enumerate(first)]
            await ready(tasks, started)
            tasks += [
                asyncio.create_task(collect(engine, greedy(f"n{i}", p, e, steps=n)))
                for i, (p, e, n) in enumerate(later)
            ]
            return await asyncio.gather(*tasks)
        finally:
            await engine.stop()

    results = run(main())
    for (prompt, spec, steps), outputs in zip(first + later, results, strict=True):
        assert_matches(outputs, reference(loaded, editor, prompt, spec, steps=steps))


@pytest.mark.parametrize("fresh_memory", ["as allocated", "NaN"])
def test_rows_that_finish_leave_room_that_newcomers_take_in_place(
    tiny_loaded: LoadedModel,
    tiny_editor: HPREditor,
    compile_decode: bool,
    monkeypatch: pytest.MonkeyPatch,
    fresh_memory: str,
) -> None:
    """Two of four rows finish early; the batch keeps its cache and moves its last row into a leaver's place
    (``Batch.filter(in_place=True)``), and two newcomers are then written into the spare rows
    (``BatchKVCache.join_in_place``; the eager step: the compiled one takes buffers without spare rows). Every
    request still gets what it gets alone. With fresh KV buffers full of NaN, as uninitialised memory may be: the
    columns planned ahead, left unwritten until decoding reaches them, are never read before (a NaN read, even
    masked, would change the outputs)."""
    if fresh_memory == "NaN":
        new_empty = torch.Tensor.new_empty

        def nan_filled(self: torch.Tensor, size: Any, **kwargs: Any) -> torch.Tensor:
            return new_empty(self, size, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled)
    joins: list[bool] = []
    join_in_place = BatchKVCache.join_in_place

    def counted(self: BatchKVCache, caches: list[BatchKVCache]) -> bool:
        joins.append(join_in_place(self, caches))
        return joins[-1]

    monkeypatch.setattr(BatchKVCache, "join_in_place", counted)
    cases = edit_cases(tiny_editor)
    long_prompt = tiny_loaded.tokenizer.encode("Once upon a time, in a land far away, there lived a cat")
    first = [(long_prompt, cases[1], 120), (long_prompt[:-3], cases[2], 3), (long_prompt[:-1], None, 120)]
    first.append((long_prompt[:-2], cases[6], 4))
    later = [(tiny_loaded.tokenizer.encode("x"), cases[3], 6), (tiny_loaded.tokenizer.encode("Hi"), cases[7], 5)]

    async def short_ones_done(tasks: list[asyncio.Task[list[GenerationOutput]]], _: asyncio.Event) -> None:
        await asyncio.gather(tasks[1], tasks[3])  # the two short ones are done; r0 and r2 still run
        assert not tasks[0].done() and not tasks[2].done()

    serve_in_two_waves(tiny_loaded, tiny_editor, compile_decode, first, later, short_ones_done)
    if not compile_decode:
        assert True in joins  # the newcomers took the spare rows in place


def test_longer_newcomers_join_in_place_through_the_head(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows with short prompts run; nobody has left, so the room is the buffers' own (spare rows, head). Two
    newcomers with longer prompts join: in place, the running rows get more left padding from the head
    (``GrowableLayer.extend_left``). Then the short rows and the longest newcomer finish, and the padding the
    last row does not need goes back to the head (``drop_left``). Every request still gets what it gets alone
    (eager; the compiled step's buffers have no room, so it joins by a copy and must match too)."""
    calls: dict[str, list[int]] = {"extend_left": [], "drop_left": []}
    for name, method in [(n, getattr(GrowableLayer, n)) for n in calls]:

        def counted_call(self: GrowableLayer, columns: int, _name: str = name, _method: Any = method) -> None:
            calls[_name].append(columns)
            _method(self, columns)

        monkeypatch.setattr(GrowableLayer, name, counted_call)
    cases = edit_cases(tiny_editor)
    encode = tiny_loaded.tokenizer.encode
    first = [(encode("Hi"), cases[1], 6), (encode("x"), None, 8)]
    long_prompt = encode("Once upon a time, in a land far away, there lived a cat who liked the sea")
    later = [(long_prompt, cases[2], 10), (long_prompt[:-4], cases[6], 20)]  # the longest leaves first

    async def decoding(tasks: list[asyncio.Task[list[GenerationOutput]]], started: asyncio.Event) -> None:
        await started.wait()  # the short rows are decoding
        assert not any(task.done() for task in tasks)

    serve_in_two_waves(tiny_loaded, tiny_editor, compile_decode, first, later, decoding)
    if not compile_decode:
        assert max(calls["extend_left"]) > 0  # the running rows took head columns
        assert max(calls["drop_left"]) > 0  # and gave them back when the short rows left


def test_a_cancelled_row_leaves_in_place_and_the_others_match_alone(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, compile_decode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client goes away mid-stream (its stream closed): the engine drops its row in place (the batch's last row
    takes its place, :meth:`Batch.filter` with ``in_place``), never copying the cache (``BatchKVCache.select``),
    and every other request still gets what it gets alone."""
    copies: list[int] = []
    select = BatchKVCache.select

    def counted(self: BatchKVCache, rows: torch.Tensor, drop_columns: int, spare: int) -> BatchKVCache:
        copies.append(len(rows))
        return select(self, rows, drop_columns, spare)

    monkeypatch.setattr(BatchKVCache, "select", counted)
    cases = edit_cases(tiny_editor)
    prompts = prompts_for(tiny_loaded, 4)
    specs = [cases[1], cases[2], None, cases[6]]

    async def main() -> list[list[GenerationOutput]]:
        engine = Engine(tiny_loaded, tiny_editor.registry, compile_decode=compile_decode, max_batch_size=16)
        engine.start()
        try:
            leaver = engine.generate(greedy("leaver", prompts[0], specs[0], steps=10_000))
            tasks = [
                asyncio.create_task(collect(engine, greedy(f"r{i}", p, e, steps=12)))
                for i, (p, e) in enumerate(zip(prompts[1:], specs[1:], strict=True), start=1)
            ]
            for _ in range(3):  # the leaver decodes beside the others, then its client goes away
                await leaver.__anext__()
            await leaver.aclose()
            return await asyncio.gather(*tasks)
        finally:
            await engine.stop()

    results = run(main())
    for prompt, spec, outputs in zip(prompts[1:], specs[1:], results, strict=True):
        assert_matches(outputs, reference(tiny_loaded, tiny_editor, prompt, spec, steps=12))
    assert copies == []  # the leaver's row was dropped in place
