"""App lifecycle (/health while loading, failed load, graceful stop), /metrics content, CORS."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope


def test_health_is_503_until_loaded_then_200(tiny_settings: ServerSettings) -> None:
    release = threading.Event()
    engines: list[FakeEngine] = []

    def blocking_factory(settings: ServerSettings, registry: Any) -> FakeEngine:
        release.wait(30)
        engines.append(FakeEngine(settings, registry))
        return engines[-1]

    with run_server(tiny_settings, blocking_factory, wait_ready=False) as live:
        assert_envelope(httpx.get(live.base_url + "/health"), 503, code="model_loading")
        assert_envelope(httpx.get(live.api_base + "/models"), 503, code="model_loading")
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(live.base_url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.get(live.base_url + "/health").json() == {"status": "ok", "model": "tiny-llama"}
        assert engines[0].started and not engines[0].stopped
    assert engines[0].stopped  # the lifespan stopped (drained) the engine on shutdown


def test_failed_load_is_reported_by_health_without_its_details(
    tiny_settings: ServerSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings.model_copy(update={"adapter": [f"gone={tmp_path / 'missing'}"]})
    with run_server(settings, FakeEngine, wait_ready=False) as live:
        deadline = time.monotonic() + 30
        while live.app.state.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        error = assert_envelope(httpx.get(live.base_url + "/health"), 503, code="load_failed")
        assert error["message"] == "the model failed to load"  # no path, no exception text
    assert str(tmp_path / "missing") in caplog.text  # the details are in the log


def test_metrics_report_requests_tokens_latency_and_edits(fake_server: Any) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "hpr": {"layers": [2]}}
    assert httpx.post(fake_server.api_base + "/completions", json=body).status_code == 200
    text = httpx.get(fake_server.base_url + "/metrics").text
    for name in (
        "hpr_http_requests_total",
        "hpr_prompt_tokens_total",
        "hpr_generation_tokens_total",
        "hpr_queue_depth",
        "hpr_running_requests",
        "hpr_step_batch_size_bucket",
        "hpr_time_to_first_token_seconds_bucket",
        "hpr_inter_token_latency_seconds_bucket",
    ):
        assert f"\n{name}" in text, name
    assert 'hpr_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'hpr_edited_tokens_total{layer="2"}' in text
    assert "_created" not in text


def test_unknown_paths_do_not_grow_metric_labels(fake_server: Any) -> None:
    for i in range(3):
        httpx.get(fake_server.base_url + f"/random/{i}")
    text = httpx.get(fake_server.base_url + "/metrics").text
    assert "/random/" not in text and 'route="other"' in text


def test_cors_is_off_by_default(fake_server: Any) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(fake_server.api_base + "/chat/completions", headers=headers)
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("keys", [[], ["sk-1"]])
def test_cors_when_enabled(tiny_settings: ServerSettings, keys: list[str]) -> None:
    settings = tiny_settings.model_copy(update={"cors_origin": ["https://app.example"], "api_key": keys})
    with run_server(settings, FakeEngine) as live:
        headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        preflight = httpx.options(live.api_base + "/chat/completions", headers=headers)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(live.api_base + "/models", headers={**headers, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
