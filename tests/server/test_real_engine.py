"""The HTTP layer over the real continuous-batching engine, on the tiny model (fp32, CPU).

Includes the HTTP-level exactness check: concurrent greedy requests with different ``hpr`` settings get exactly
what each gets when served alone (the engine-level version, with logits, is in tests/server/engine/).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from server.settings import ServerSettings
from tests.server.live_server import run_server

USER = [{"role": "user", "content": "Tell me"}]
EDITS: list[dict[str, Any] | None] = [
    None,
    {"adapter": "tiny"},
    {"adapter": "tiny", "layers": "all"},
    {"adapter": "tiny", "layers": [1, 3]},
    {"adapter": "tiny", "layers": "all", "alpha": 0.5},
    {"adapter": "tiny", "layers": "all", "alpha": 2.0},
    {"adapter": "tiny", "layers": "all", "scope": "generated"},
    {"adapter": "tiny", "layers": "none"},
]


@pytest.fixture(scope="module")
def real_server(tiny_settings: ServerSettings) -> Any:
    with run_server(tiny_settings.model_copy(update={"max_batch_size": 8})) as live:
        yield live


def greedy_body(hpr: dict[str, Any] | None, prompt: str = "Once upon", max_tokens: int = 6) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    body["ignore_eos"] = True
    if hpr is not None:
        body["hpr"] = hpr
    return body


def tokens_and_logprobs(response: dict[str, Any]) -> tuple[list[str], list[float]]:
    logprobs = response["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


async def _post_all(base: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/completions", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json() for r in responses]


def test_concurrent_greedy_requests_equal_each_served_alone(real_server: Any) -> None:
    bodies = [greedy_body(edit) for edit in EDITS]
    alone = [httpx.post(real_server.api_base + "/completions", json=b, timeout=60).json() for b in bodies]
    together = asyncio.run(_post_all(real_server.api_base, bodies))
    for edit, a, t in zip(EDITS, alone, together, strict=True):
        tokens_a, lp_a = tokens_and_logprobs(a)
        tokens_t, lp_t = tokens_and_logprobs(t)
        assert tokens_t == tokens_a, edit
        assert lp_t == pytest.approx(lp_a, abs=1e-4), edit
    # the edits do something, and "none" is the base model
    outputs = [tokens_and_logprobs(a) for a in alone]
    assert outputs[-1] == outputs[0]
    assert len({tuple(lp) for _tokens, lp in outputs}) > 2


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(real_server: Any) -> None:
    body = {"prompt": "abc", "max_tokens": 10, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = httpx.post(real_server.api_base + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
    others = [{**body, "seed": s, "hpr": {"adapter": "tiny", "alpha": 0.1 * s}} for s in range(1, 6)]
    together = asyncio.run(_post_all(real_server.api_base, [*others[:3], body, *others[3:]]))
    assert together[3]["choices"][0]["text"] == alone


def test_sdk_sync_async_and_streaming(real_server: Any) -> None:
    client = openai.OpenAI(base_url=real_server.api_base, api_key="x", max_retries=0)
    sync = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=6,
        temperature=0,
        extra_body={"hpr": {"return_stats": True}},  # type: ignore[arg-type]
    )
    assert sync.choices[0].finish_reason in ("stop", "length")
    stats = sync.choices[0].model_extra["hpr_stats"]  # type: ignore[index]
    assert set(stats) == {"0", "1"} and all(0.0 <= s["share_rotated"] <= 1.0 for s in stats.values())
    assert all(s["tokens"] > 0 for s in stats.values())

    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, stream=True)  # type: ignore[arg-type]
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == sync.choices[0].message.content

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=real_server.api_base, api_key="x", max_retries=0) as aclient:
            r = await aclient.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0)  # type: ignore[arg-type]
            return r.choices[0].message.content or ""

    assert asyncio.run(run()) == sync.choices[0].message.content


def test_prompt_scoring_with_echo_and_max_tokens_0(real_server: Any) -> None:
    body = {"prompt": "The cat sat", "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = httpx.post(real_server.api_base + "/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"] == "The cat sat"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == "The cat sat"
    assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])
    edited = httpx.post(
        real_server.api_base + "/completions", json={**body, "model": "tiny", "hpr": {"layers": "all"}}, timeout=60
    ).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert edited[1:] != lp["token_logprobs"][1:]


def test_dropped_stream_frees_its_slot(real_server: Any) -> None:
    engine = real_server.engine
    body = {"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", real_server.api_base + "/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # keep a reference: dropping the iterator closes the stream
        for _ in range(3):
            next(lines)
        assert engine.running + engine.queue_depth >= 1
    deadline = time.monotonic() + 20
    while engine.running + engine.queue_depth > 0:
        assert time.monotonic() < deadline, "the dropped stream still holds a slot"
        time.sleep(0.02)


def test_overload_with_the_real_engine_is_429(tiny_settings: ServerSettings) -> None:
    settings = tiny_settings.model_copy(update={"max_batch_size": 1, "max_queue": 0})
    with run_server(settings) as live:
        body = {"prompt": "x", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", live.api_base + "/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # keep a reference: dropping the iterator closes the stream
            next(lines)
            refused = httpx.post(live.api_base + "/completions", json={"prompt": "y", "max_tokens": 1}, timeout=60)
            assert refused.status_code == 429 and "retry-after" in refused.headers
            assert refused.json()["error"]["code"] == "queue_full"


def test_scope_generated_leaves_prompt_scores_unedited(real_server: Any) -> None:
    """Scoring a prompt reads the predictions made at prompt positions 0..n-2; scope "generated" edits only the
    last prompt token and later ones, so those scores are the base model's — while scope "all" changes them."""

    def prompt_logprobs(hpr: dict[str, Any] | None) -> list[float]:
        body: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 0}
        if hpr is not None:
            body["hpr"] = hpr
        response = httpx.post(real_server.api_base + "/completions", json=body, timeout=60).json()
        return list(response["choices"][0]["logprobs"]["token_logprobs"][1:])

    base = prompt_logprobs(None)
    generated = prompt_logprobs({"adapter": "tiny", "layers": "all", "scope": "generated"})
    everywhere = prompt_logprobs({"adapter": "tiny", "layers": "all", "scope": "all"})
    assert generated == pytest.approx(base, abs=1e-5)
    assert everywhere != pytest.approx(base, abs=1e-3)
