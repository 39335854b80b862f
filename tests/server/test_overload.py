"""Past the running batch and the queue, requests get 429 with Retry-After — streaming ones included."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope


def slow_engine(settings: ServerSettings, registry: Any) -> FakeEngine:
    return FakeEngine(settings, registry, step_delay=0.05)


def test_overload_is_429_with_retry_after(tiny_settings: ServerSettings) -> None:
    settings = tiny_settings.model_copy(update={"max_batch_size": 1, "max_queue": 1})
    with run_server(settings, slow_engine) as live:
        body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True}
        busy = [
            threading.Thread(
                target=httpx.post, args=(live.api_base + "/completions",), kwargs={"json": body, "timeout": 30}
            )
            for _ in range(2)
        ]
        for thread in busy:
            thread.start()
        deadline = time.monotonic() + 10
        while len(live.engine.active) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = httpx.post(live.api_base + "/completions", json={"prompt": "x", "max_tokens": 1})
        error = assert_envelope(response, 429, code="queue_full")
        assert error["type"] == "rate_limit_error"
        assert response.headers["retry-after"] == "1"  # refused by admission, before the engine sees it
        stream = httpx.post(live.api_base + "/completions", json={"prompt": "x", "max_tokens": 1, "stream": True})
        assert_envelope(stream, 429)  # refused before any SSE header
        for thread in busy:
            thread.join()
        assert httpx.post(live.api_base + "/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
