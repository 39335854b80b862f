"""SSE streams: framing, a failure mid-stream, and a client that leaves (its generation is cancelled)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from server.settings import ServerSettings
from tests.server.fake_engine import SCRIPT, FakeEngine
from tests.server.live_server import run_server

USER = [{"role": "user", "content": "hi"}]


def sse_payloads(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def slow_engine(settings: ServerSettings, registry: Any) -> FakeEngine:
    return FakeEngine(settings, registry, step_delay=0.05)


@pytest.fixture(scope="module")
def slow_server(tiny_settings: ServerSettings) -> Any:
    with run_server(tiny_settings, slow_engine) as live:
        yield live


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_stream_framing_ends_with_done(fake_server: Any) -> None:
    body = {"messages": USER, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", fake_server.api_base + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_failure_mid_stream_is_one_error_frame_then_done(fake_server: Any) -> None:
    body = {"messages": [{"role": "user", "content": "FAIL"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", fake_server.api_base + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    errors = [json.loads(p) for p in payloads[:-1] if "error" in json.loads(p)]
    assert len(errors) == 1 and payloads[-2] == json.dumps(errors[0])
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert errors[0]["error"]["type"] == "server_error"
    # the server lives on
    assert httpx.post(fake_server.api_base + "/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200


def test_sdk_raises_on_an_error_frame(fake_server: Any) -> None:
    client = openai.OpenAI(base_url=fake_server.api_base, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "FAIL"}],
        stream=True,  # type: ignore[arg-type]
    )
    with pytest.raises(openai.APIError):
        list(stream)


def test_dropped_stream_frees_its_slot(slow_server: Any) -> None:
    engine = slow_server.engine
    body = {"messages": USER, "max_tokens": 200, "stream": True, "extra": "dropped", "ignore_eos": True}
    with httpx.stream("POST", slow_server.api_base + "/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for line in lines:
            if '"content":"He' in line or '"content":"H"' in line:
                break
        request_id = engine.requests[-1].request_id
        assert request_id in engine.active
    # leaving the `with` closed the connection mid-stream
    assert wait_until(lambda: request_id in engine.cancelled), "the generation was not cancelled"
    assert request_id not in engine.active


def test_disconnected_non_streaming_request_is_cancelled(slow_server: Any) -> None:
    engine = slow_server.engine
    body = {"messages": USER, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.api_base + "/chat/completions", json=body, timeout=0.5)
    request_id = engine.requests[-1].request_id
    assert wait_until(lambda: request_id in engine.cancelled), "the generation was not cancelled"


def test_n_streams_all_cancelled_on_disconnect(slow_server: Any) -> None:
    engine = slow_server.engine
    body = {"prompt": "x", "max_tokens": 200, "n": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", slow_server.api_base + "/completions", json=body) as response:
        next(response.iter_lines())
        ids = [r.request_id for r in engine.requests[-3:]]
    assert wait_until(lambda: all(i in engine.cancelled for i in ids))


def test_completion_stream_matches_non_stream(fake_server: Any) -> None:
    body = {"prompt": "ab", "max_tokens": 50}
    whole = httpx.post(fake_server.api_base + "/completions", json=body).json()["choices"][0]
    with httpx.stream("POST", fake_server.api_base + "/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"] == SCRIPT
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "stop"
