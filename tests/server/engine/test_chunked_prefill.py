"""Chunked prefill: prompts prefilled a few tokens per forward give what a whole-prompt prefill gives (tokens,
logprobs, prompt logprobs, edit statistics, every scope), and running streams decode between the chunks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from hpr.editing import HPREditor
from hpr.model import LoadedModel
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from tests.server.engine.conftest import collect, count_steps, joined, run

TEXTS = ["Hi", "Tell me about the sea and the wind", "A much longer prompt, so that the rows are padded a lot here"]


def _requests(loaded: LoadedModel, editor: HPREditor) -> list[GenerationRequest]:
    edits = [
        editor.resolve("tiny", [0, 2], alpha=2.0),  # every position
        editor.resolve("other", [1, 3], alpha=1.5, scope="generated"),  # the last prompt token on
        None,
    ]
    out = []
    for i, (text, edit) in enumerate(zip(TEXTS, edits, strict=True)):
        sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=i == 1)
        out.append(GenerationRequest(f"r{i}", loaded.tokenizer.encode(text), sampling, edit=edit, return_stats=True))
    return out


def _generate_together(engine: Engine, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    async def main() -> list[list[GenerationOutput]]:
        return list(await asyncio.gather(*(collect(engine, r) for r in requests)))

    return run(main())


@pytest.mark.parametrize("chunk", [4, 7])
def test_chunked_prefill_gives_what_a_whole_prefill_gives(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor, chunk: int
) -> None:
    requests = _requests(tiny_loaded, tiny_editor)
    longest = max(len(r.prompt_ids) for r in requests)
    results = {}
    chunk_calls = {}
    for name, setting in (("whole", None), ("chunked", chunk)):
        engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=setting, gather_window=0.2)
        calls: list[str] = []
        count_steps(engine, calls)
        engine.start()
        try:
            results[name] = _generate_together(engine, requests)
        finally:
            run(engine.stop(drain_timeout=10))
        chunk_calls[name] = calls.count("chunk")
    # The three prompts are prefilled together, left-padded to the longest: chunk // 3 columns per forward.
    columns = max(1, chunk // 3)
    assert chunk_calls == {"whole": 1, "chunked": -(-longest // columns)}
    for whole, chunked in zip(results["whole"], results["chunked"], strict=True):
        assert joined(chunked) == joined(whole)
        lp_whole = [lp for o in whole for lp in o.logprobs or []]
        lp_chunked = [lp for o in chunked for lp in o.logprobs or []]
        assert len(lp_whole) == len(lp_chunked) == 6
        for a, b in zip(lp_whole, lp_chunked, strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t[0] for t in a.top] == [t[0] for t in b.top]
        stats_whole, stats_chunked = whole[-1].edit_stats, chunked[-1].edit_stats
        assert stats_whole is not None and stats_chunked is not None
        assert set(stats_whole.layers) == set(stats_chunked.layers)
        for layer, s in stats_whole.layers.items():
            c = stats_chunked.layers[layer]
            assert (c.tokens, c.changed) == (s.tokens, s.changed)
            assert c.mean_amount == pytest.approx(s.mean_amount, abs=1e-5)
    # scope all counts every prompt token plus the 5 fed back; scope generated the last prompt token plus those 5
    first, second = (r[-1].edit_stats for r in results["chunked"][:2])
    assert first is not None and all(s.tokens == len(requests[0].prompt_ids) + 5 for s in first.layers.values())
    assert second is not None and all(s.tokens == 1 + 5 for s in second.layers.values())
    prompt_whole = [o.prompt_logprobs for o in results["whole"][1] if o.prompt_logprobs]
    prompt_chunked = [o.prompt_logprobs for o in results["chunked"][1] if o.prompt_logprobs]
    assert len(prompt_whole) == len(prompt_chunked) == 1
    assert len(prompt_chunked[0]) == len(requests[1].prompt_ids)
    for a, b in zip(prompt_whole[0][1:], prompt_chunked[0][1:], strict=True):
        assert a is not None and b is not None
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_running_streams_decode_between_the_chunks_of_a_newcomer(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor
) -> None:
    tokenizer = tiny_loaded.tokenizer
    long_prompt = tokenizer.encode("word " * 40)
    # chunks in forwards of their own (test_mixed_prefill.py: the chunk and the decode step in one forward)
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=8, mixed_prefill=False)
    calls: list[str] = []
    count_steps(engine, calls)

    async def main() -> tuple[list[GenerationOutput], list[GenerationOutput]]:
        running = GenerationRequest(
            "running", tokenizer.encode("Hi"), SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        )
        newcomer = GenerationRequest(
            "newcomer", long_prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        )
        stream = engine.generate(running)
        first = [await anext(stream)]  # the running stream has started decoding
        calls.append("newcomer submitted")
        late = asyncio.create_task(collect(engine, newcomer))
        rest = [o async for o in stream]
        return first + rest, await late

    engine.start()
    try:
        running_out, newcomer_out = run(main())
    finally:
        run(engine.stop(drain_timeout=10))
    assert len(joined(running_out)[0]) == 60 and len(joined(newcomer_out)[0]) == 2
    after = calls[calls.index("newcomer submitted") :]
    chunks = [i for i, c in enumerate(after) if c == "chunk"]
    assert len(chunks) == -(-len(long_prompt) // 8) >= 5
    between = after[chunks[0] : chunks[-1] + 1]
    # after each chunk but the last, one decode step of the running stream before the next chunk
    assert between.count("decode") == len(chunks) - 1
    assert all(between[i] == "decode" for i in range(1, len(between), 2))


def test_a_prefill_whose_clients_all_left_stops_between_chunks(
    tiny_loaded: LoadedModel, tiny_editor: HPREditor
) -> None:
    tokenizer = tiny_loaded.tokenizer
    engine = Engine(tiny_loaded, tiny_editor.registry, prefill_chunk=4)
    calls: list[str] = []
    count_steps(engine, calls)
    runner = engine.runner
    chunk = runner._prefill_chunk

    def slow_chunk(job: Any) -> Any:
        time.sleep(0.05)  # room for the client to leave mid-prefill
        return chunk(job)

    runner._prefill_chunk = slow_chunk  # type: ignore[method-assign]
    prompt = tokenizer.encode("word " * 40)

    async def main() -> None:
        request = GenerationRequest("gone", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        task = asyncio.create_task(collect(engine, request))
        while calls.count("chunk") < 2:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # several chunks' time
        assert engine.running == 0  # the slot is free again
        chunks_before = calls.count("chunk")
        short = GenerationRequest("next", tokenizer.encode("Hi"), SamplingParams(max_tokens=3, temperature=0.0))
        assert len(joined(await collect(engine, short))[0]) == 3  # and the engine serves the next request
        calls.append(f"abandoned after {chunks_before}")

    engine.start()
    try:
        run(main())
    finally:
        run(engine.stop(drain_timeout=10))
    total = -(-len(prompt) // 4)
    abandoned_after = int(next(c for c in calls if c.startswith("abandoned")).split()[-1])
    assert 2 <= abandoned_after <= 4 < total
