"""Engine behaviours a client relies on: limits, stop conditions, logprobs, errors, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hpr.editing import HPREditor
from hpr.errors import UnknownAdapterError
from hpr.model import LoadedModel
from server.engine import sampling as sampling_module
from server.engine.engine import Engine
from server.engine.types import (
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)
from tests.server.engine.conftest import StepSizes, collect, joined, run

NO_SPECIALS = {i: -100.0 for i in range(6)}  # the random tiny model likes special tokens, which decode to ""


def request(
    loaded: LoadedModel, text: str = "Hello there", request_id: str = "r", **sampling: Any
) -> GenerationRequest:
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **sampling}
    return GenerationRequest(request_id, loaded.tokenizer.encode(text), SamplingParams(**params))


def test_max_tokens_finishes_with_length_and_counts_usage(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            return await collect(engine, request(tiny_loaded, max_tokens=5))

    outputs = run(main())
    tokens, text = joined(outputs)
    assert len(tokens) == 5
    assert outputs[-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert outputs[-1].completion_tokens == 5
    assert outputs[-1].prompt_tokens == len(tiny_loaded.tokenizer.encode("Hello there"))
    assert text == tiny_loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_eos_and_stop_token_ids_finish_with_stop(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        async with make_engine() as engine:
            free = await collect(engine, request(tiny_loaded, max_tokens=6))
            first = joined(free)[0][2]
            stopped = await collect(engine, request(tiny_loaded, max_tokens=6, stop_token_ids=(first,)))
            return free, stopped

    free, stopped = run(main())
    tokens = joined(free)[0]
    assert joined(stopped)[0] == tokens[: tokens.index(tokens[2]) + 1]
    assert stopped[-1].finish_reason == "stop"


def test_stop_string_is_cut_with_what_follows_and_never_streamed(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> tuple[str, list[GenerationOutput]]:
        async with make_engine() as engine:
            free = joined(await collect(engine, request(tiny_loaded, max_tokens=12, logit_bias=NO_SPECIALS)))[1]
            stop = free[3:5]  # two characters in the middle of the free text
            stopped = request(tiny_loaded, max_tokens=12, stop=(stop, "never-there"), logit_bias=NO_SPECIALS)
            return free, await collect(engine, stopped)

    free, outputs = run(main())
    stop = free[3:5]
    text = joined(outputs)[1]
    assert text == free[: free.index(stop)]
    assert outputs[-1].finish_reason == "stop"
    assert stop not in "".join(o.text for o in outputs)
    assert outputs[-1].completion_tokens == free.index(stop) + len(stop)  # char-level tokenizer: 1 token = 1 char


def test_logprobs_and_top_alternatives(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            return await collect(engine, request(tiny_loaded, max_tokens=4, logprobs=3))

    outputs = run(main())
    logprobs = [lp for o in outputs for lp in o.logprobs or []]
    assert [lp.token_id for lp in logprobs] == joined(outputs)[0]
    for lp in logprobs:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the best one
        assert math.isclose(lp.top[0][2], lp.logprob, abs_tol=1e-6)
        assert [v for _, _, v in lp.top] == sorted((v for _, _, v in lp.top), reverse=True)
        assert lp.token == tiny_loaded.tokenizer.decode([lp.token_id])


def test_max_tokens_zero_scores_the_prompt(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    text = "The cat sat on the mat"
    ids = tiny_loaded.tokenizer.encode(text)

    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            return await collect(engine, request(tiny_loaded, text, max_tokens=0, prompt_logprobs=True, logprobs=2))

    outputs = run(main())
    assert len(outputs) == 1
    out = outputs[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length" and out.completion_tokens == 0
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    with torch.inference_mode():
        want = torch.log_softmax(tiny_loaded.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    for position, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp is not None and lp.token_id == ids[position]
        assert abs(lp.logprob - float(want[position - 1, ids[position]])) < 1e-4
        assert len(lp.top) == 2


def test_max_tokens_zero_without_prompt_logprobs_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=0)
    assert info.value.param == "max_tokens"


def test_prompt_too_long_is_refused_and_generation_is_clamped_to_the_context(
    tiny_loaded: LoadedModel, make_engine: Any
) -> None:
    async def main() -> list[GenerationOutput]:
        async with make_engine(max_model_len=20) as engine:
            with pytest.raises(PromptTooLongError) as info:
                await collect(engine, request(tiny_loaded, "x" * 20))
            assert info.value.param == "prompt"
            return await collect(engine, request(tiny_loaded, "x" * 15, max_tokens=100))

    outputs = run(main())
    assert outputs[-1].completion_tokens == 5
    assert outputs[-1].finish_reason == "length"


def test_bad_requests_are_refused_before_any_output(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, make_engine: Any
) -> None:
    async def main() -> None:
        async with make_engine() as engine:
            with pytest.raises(InvalidRequestError, match="empty"):
                await collect(engine, GenerationRequest("e", [], SamplingParams()))
            with pytest.raises(InvalidRequestError) as info:
                await collect(engine, GenerationRequest("v", [10_000], SamplingParams()))
            assert info.value.param == "prompt"
            with pytest.raises(InvalidRequestError) as info:
                await collect(engine, request(tiny_loaded, logit_bias={10_000: 1.0}))
            assert info.value.param == "logit_bias"
            spec = tiny_editor.resolve("tiny", "all")
            ghost = GenerationRequest("g", [7, 8], SamplingParams(), edit=type(spec)("ghost", (0,)))
            with pytest.raises(UnknownAdapterError):
                await collect(engine, ghost)

    run(main())


def test_queue_full_is_refused_and_running_requests_are_unaffected(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> None:
        async with make_engine(max_batch_size=1, max_queue=1) as engine:
            first = engine.generate(request(tiny_loaded, request_id="first", max_tokens=200))
            await first.__anext__()  # running: the batch (of 1) is full
            second = engine.generate(request(tiny_loaded, request_id="second", max_tokens=3))
            second_task = asyncio.create_task(collect_iter(second))
            await asyncio.sleep(0)
            while engine.queue_depth < 1:
                await asyncio.sleep(0.001)
            with pytest.raises(QueueFullError) as info:
                await collect(engine, request(tiny_loaded, request_id="third"))
            assert info.value.retry_after > 0
            rest = [o async for o in first]
            assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 200
            assert (await second_task)[-1].completion_tokens == 3

    run(main())


async def collect_iter(iterator: Any) -> list[GenerationOutput]:
    return [o async for o in iterator]


def test_closing_the_stream_cancels_and_frees_the_slot(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> None:
        async with make_engine(max_batch_size=1) as engine:
            stream = engine.generate(request(tiny_loaded, request_id="leaver", max_tokens=10_000))
            await stream.__anext__()
            assert engine.running == 1
            await stream.aclose()  # the client went away
            # the only slot is free again: another request runs to completion
            outputs = await asyncio.wait_for(collect(engine, request(tiny_loaded, max_tokens=3)), timeout=30)
            assert outputs[-1].completion_tokens == 3

    run(main())


def test_cancelling_the_consumer_task_cancels_the_request(tiny_loaded: LoadedModel, make_engine: Any) -> None:
    async def main() -> None:
        async with make_engine(max_batch_size=2) as engine:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in engine.generate(request(tiny_loaded, max_tokens=10_000)):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(1000):
                if engine.running == 0:
                    break
                await asyncio.sleep(0.005)
            assert engine.running == 0

    run(main())


def test_a_failing_request_fails_alone(
    tiny_loaded: LoadedModel, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while sampling one row (here: any row with seed 666) fails that request only."""
    real_sample: Callable[..., torch.Tensor] = sampling_module.sample

    def flaky_sample(processed: torch.Tensor, state: sampling_module.SamplingState) -> torch.Tensor:
        if any(p.seed == 666 for p in state.params):
            raise RuntimeError("boom in sampling")
        return real_sample(processed, state)

    monkeypatch.setattr("server.engine.selection.sample", flaky_sample)

    async def main() -> list[list[GenerationOutput] | BaseException]:
        async with make_engine() as engine:
            good = [request(tiny_loaded, f"prompt {i}", request_id=f"g{i}", max_tokens=6, seed=i) for i in range(3)]
            bad = request(tiny_loaded, "bad one", request_id="bad", max_tokens=6, seed=666, temperature=0.5)
            results = await asyncio.gather(
                *(collect(engine, r) for r in [good[0], bad, *good[1:]]), return_exceptions=True
            )
            after = await collect(engine, request(tiny_loaded, max_tokens=2))  # the engine lives on
            assert after[-1].completion_tokens == 2
            return results

    results = run(main())
    assert isinstance(results[1], RuntimeError) and "boom" in str(results[1])
    for result in (results[0], results[2], results[3]):
        assert isinstance(result, list) and result[-1].completion_tokens == 6


def test_graceful_stop_drains_running_requests_and_refuses_new_ones(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor
) -> None:
    async def main() -> None:
        engine = Engine(tiny_loaded, tiny_editor.registry, max_batch_size=1)
        engine.start()
        running = engine.generate(request(tiny_loaded, request_id="running", max_tokens=30))
        first = await running.__anext__()
        queued = asyncio.create_task(collect(engine, request(tiny_loaded, request_id="queued")))
        while engine.queue_depth < 1:
            await asyncio.sleep(0.001)
        stopping = asyncio.create_task(engine.stop(drain_timeout=30))
        rest = [o async for o in running]
        await stopping
        assert first.completion_tokens + sum(len(o.token_ids) for o in rest) == 30
        assert rest[-1].finish_reason == "length"
        with pytest.raises(EngineStoppedError):
            await queued
        with pytest.raises(EngineStoppedError):
            await collect(engine, request(tiny_loaded))
        assert not engine.is_running

    run(main())


def test_stop_past_the_drain_timeout_fails_the_stragglers(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    async def main() -> None:
        engine = Engine(tiny_loaded, tiny_editor.registry)
        engine.start()
        endless = engine.generate(request(tiny_loaded, max_tokens=100_000))
        await endless.__anext__()
        await engine.stop(drain_timeout=0.05)
        with pytest.raises(EngineStoppedError):
            async for _ in endless:
                pass

    run(main())


def test_edit_stats_are_returned_on_the_last_event(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, make_engine: Any
) -> None:
    prompt = tiny_loaded.tokenizer.encode("Count my tokens")

    async def main() -> list[list[GenerationOutput]]:
        async with make_engine() as engine:
            reqs = [
                GenerationRequest(
                    "all",
                    prompt,
                    SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                    edit=tiny_editor.resolve("tiny", [0, 2]),
                    return_stats=True,
                ),
                GenerationRequest(
                    "gen",
                    prompt,
                    SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                    edit=tiny_editor.resolve("tiny", [1], scope="generated"),
                    return_stats=True,
                ),
            ]
            return await asyncio.gather(*(collect(engine, r) for r in reqs))

    every, generated = run(main())
    last = every[-1].edit_stats
    assert last is not None and set(last.layers) == {0, 2}
    stats = last.layers
    # prompt tokens + the tokens fed back (the last generated token is never fed)
    assert all(s.tokens == len(prompt) + 3 for s in stats.values())
    assert all(0 <= s.changed <= s.tokens and 0 <= s.mean_amount <= math.pi for s in stats.values())
    assert all(o.edit_stats is None for o in every[:-1])
    gen_stats = generated[-1].edit_stats
    assert gen_stats is not None and gen_stats.layers[1].tokens == 1 + 3  # last prompt token + fed-back tokens


def test_edit_stats_arrive_when_a_stop_string_ends_the_request(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, make_engine: Any
) -> None:
    prompt = tiny_loaded.tokenizer.encode("Count my tokens")

    def stats_request(stop: tuple[str, ...]) -> GenerationRequest:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=stop, logit_bias=NO_SPECIALS)
        return GenerationRequest("s", prompt, params, edit=tiny_editor.resolve("tiny", [3]), return_stats=True)

    async def main() -> list[GenerationOutput]:
        async with make_engine() as engine:
            free = joined(await collect(engine, stats_request(())))[1]
            return await collect(engine, stats_request((free[6:8],)))

    outputs = run(main())
    last = outputs[-1]
    assert last.finish_reason == "stop"
    stats = last.edit_stats
    assert stats is not None and stats.layers[3].tokens >= len(prompt) + last.completion_tokens - 1


def test_max_queue_zero_admits_while_a_slot_is_free_and_refuses_when_full(
    tiny_loaded: LoadedModel, make_engine: Any
) -> None:
    async def main() -> None:
        async with make_engine(max_batch_size=1, max_queue=0) as engine:
            first = engine.generate(request(tiny_loaded, request_id="first", max_tokens=200))
            await first.__anext__()
            with pytest.raises(QueueFullError):
                await collect(engine, request(tiny_loaded, request_id="second"))
            await first.aclose()
            for _ in range(2000):
                if engine.running == 0:
                    break
                await asyncio.sleep(0.005)
            outputs = await collect(engine, request(tiny_loaded, request_id="third", max_tokens=2))
            assert outputs[-1].completion_tokens == 2

    run(main())


@pytest.mark.parametrize(("window", "together"), [(0.2, True), (0.0, False)])
def test_an_idle_engine_gathers_requests_sent_moments_apart(
    tiny_loaded: LoadedModel, make_engine: Any, window: float, together: bool
) -> None:
    """The two columns of an A/B comparison arrive a few ms apart; both must be in the first step."""
    observer = StepSizes()

    async def main() -> None:
        async with make_engine(gather_window=window, observer=observer) as engine:
            first = asyncio.ensure_future(collect(engine, request(tiny_loaded, request_id="a", max_tokens=3)))
            await asyncio.sleep(0.05)  # far longer than the tiny model's step: without a window, a runs alone first
            second = asyncio.ensure_future(collect(engine, request(tiny_loaded, request_id="b", max_tokens=3)))
            await asyncio.gather(first, second)

    run(main())
    assert (observer.sizes[0] == 2) is together, observer.sizes
