"""The official ``openai`` SDK (sync, async, streaming, ``extra_body``) against the server with the fake engine.

These pin the HTTP mapping: what the SDK sends becomes the right engine requests, and what the engine yields
becomes responses the SDK parses. The same calls against the real engine are in test_real_engine.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.server.fake_engine import PROMPT_LOGPROB, SCRIPT, TOKEN_LOGPROB

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(fake_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.api_base, api_key="unused", max_retries=0)


def test_chat_sync(client: openai.OpenAI, fake_server: Any) -> None:
    response = client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=5)  # type: ignore[arg-type]
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion" and response.created > 0
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == SCRIPT[:5]
    assert choice.finish_reason == "length"
    prompt_ids = fake_server.engine.requests[-1].prompt_ids
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 5 and response.usage.total_tokens == len(prompt_ids) + 5


def test_chat_uses_the_chat_template(client: openai.OpenAI, fake_server: Any) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "developer", "content": "D"},
    ]
    client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=1)  # type: ignore[arg-type]
    tokenizer = fake_server.app.state.runtime.tokenizer
    text = tokenizer.decode(fake_server.engine.requests[-1].prompt_ids)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n"
        "<|im_start|>system\nD<|im_end|>\n<|im_start|>assistant\n"
    )


def test_finish_reason_stop_at_eos_and_stop_strings(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=50)  # type: ignore[arg-type]
    assert full.choices[0].message.content == SCRIPT and full.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="tiny-llama", messages=USER, stop="w")  # type: ignore[arg-type]
    assert cut.choices[0].message.content == "Hello " and cut.choices[0].finish_reason == "stop"


def test_sampling_parameters_reach_the_engine(client: openai.OpenAI, fake_server: Any) -> None:
    client.chat.completions.create(
        model="tiny-llama",
        messages=USER,  # type: ignore[arg-type]
        max_tokens=9,
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        seed=11,
        n=3,
        stop=["x", "yz"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"7": 2.0},
        user="someone",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [9]},
    )
    requests = fake_server.engine.requests[-3:]
    assert [r.sampling.seed for r in requests] == [11, 12, 13]
    assert len({r.request_id for r in requests}) == 3
    s = requests[0].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p) == (4, 0.7, 0.9, 5, 0.1)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert s.stop == ("x", "yz") and s.stop_token_ids == (9,) and s.ignore_eos
    assert dict(s.logit_bias) == {7: 2.0}
    assert s.logprobs is None and not s.prompt_logprobs


def test_chat_default_max_tokens_is_the_rest_of_the_context(client: openai.OpenAI, fake_server: Any) -> None:
    client.chat.completions.create(model="tiny-llama", messages=USER)  # type: ignore[arg-type]
    request = fake_server.engine.requests[-1]
    assert request.sampling.max_tokens == 256 - len(request.prompt_ids)


def test_chat_n_choices_and_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny-llama",
        messages=USER,
        max_tokens=3,
        n=2,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage is not None and response.usage.completion_tokens == 6
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in content] == list(SCRIPT[:3])  # type: ignore[union-attr]
    assert content[0].logprob == TOKEN_LOGPROB and len(content[0].top_logprobs) == 2  # type: ignore[index]
    assert content[0].bytes == list(b"H")  # type: ignore[index]


def test_chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,  # type: ignore[arg-type]
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"hpr": {"layers": "all"}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT[:4]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[0].model_extra["hpr"]["layers"] == [0, 1, 2, 3]  # type: ignore[index]


def test_chat_streaming_n_2_interleaves_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=3, n=2, stream=True)  # type: ignore[arg-type]
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert texts == {0: SCRIPT[:3], 1: SCRIPT[:3]} and finished == {0, 1}


def test_chat_async_concurrent(fake_server: Any) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=fake_server.api_base, api_key="x", max_retries=0) as client:
            calls = [
                client.chat.completions.create(
                    model="tiny",
                    messages=USER,
                    max_tokens=2 + i,
                    extra_body={"hpr": {"alpha": i / 4}},  # type: ignore[arg-type]
                )
                for i in range(6)
            ]
            return [r.choices[0].message.content or "" for r in await asyncio.gather(*calls)]

    assert asyncio.run(run()) == [SCRIPT[: 2 + i] for i in range(6)]


def test_async_streaming(fake_server: Any) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=fake_server.api_base, api_key="x", max_retries=0) as client:
            stream = await client.completions.create(model="tiny-llama", prompt="ab", max_tokens=5, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(run()) == SCRIPT[:5]


def test_completions_list_of_prompts_and_n(client: openai.OpenAI, fake_server: Any) -> None:
    response = client.completions.create(model="tiny-llama", prompt=["ab", "cde"], max_tokens=2, n=2, seed=5)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert all(c.text == SCRIPT[:2] for c in response.choices)
    assert response.usage is not None and response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 8
    assert [r.sampling.seed for r in fake_server.engine.requests[-4:]] == [5, 6, 5, 6]


def test_completions_token_id_prompts(client: openai.OpenAI, fake_server: Any) -> None:
    response = client.completions.create(model="tiny-llama", prompt=[[40, 41], [42]], max_tokens=1, echo=True)
    assert [r.prompt_ids for r in fake_server.engine.requests[-2:]] == [[40, 41], [42]]
    assert response.choices[0].text == "BCH" and response.choices[1].text == "DH"


def test_completions_echo_with_max_tokens_0_scores_the_prompt(client: openai.OpenAI, fake_server: Any) -> None:
    response = client.completions.create(model="tiny-llama", prompt="abcd", max_tokens=0, echo=True, logprobs=1)
    choice = response.choices[0]
    assert choice.text == "abcd"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["a", "b", "c", "d"]
    assert choice.logprobs.token_logprobs == [None, PROMPT_LOGPROB, PROMPT_LOGPROB, PROMPT_LOGPROB]
    assert choice.logprobs.text_offset == [0, 1, 2, 3]
    assert choice.logprobs.top_logprobs is not None and choice.logprobs.top_logprobs[0] is None
    assert response.usage is not None and response.usage.completion_tokens == 0
    sampling = fake_server.engine.requests[-1].sampling
    assert sampling.prompt_logprobs and sampling.max_tokens == 0


def test_completions_logprobs_without_echo_offsets_follow_the_prompt(client: openai.OpenAI) -> None:
    response = client.completions.create(model="tiny-llama", prompt="abc", max_tokens=3, logprobs=0)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == list(SCRIPT[:3]) and logprobs.text_offset == [3, 4, 5]
    assert logprobs.token_logprobs == [TOKEN_LOGPROB] * 3


def test_completions_streaming_echo(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="tiny-llama", prompt="ab", max_tokens=3, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "ab" + SCRIPT[:3]


def test_extra_body_hpr_reaches_the_engine(client: openai.OpenAI, fake_server: Any) -> None:
    response = client.completions.create(
        model="tiny-llama",
        prompt="x",
        max_tokens=1,
        extra_body={"hpr": {"adapter": "tiny", "layers": "2-3", "alpha": 1.5, "scope": "generated"}},
    )
    assert response.model_extra is not None
    assert response.model_extra["hpr"] == {
        "adapter": "tiny",
        "layers": [2, 3],
        "alpha": 1.5,
        "scope": "generated",
        "edit_tokens": "all",
    }
    edit = fake_server.engine.requests[-1].edit
    assert (edit.layers, edit.alpha, edit.scope) == ((2, 3), 1.5, "generated")


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
    assert not_found.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=USER, extra_body={"hpr": {"layers": [7]}})  # type: ignore[arg-type]
    assert bad.value.body["param"] == "hpr.layers"  # type: ignore[index]
