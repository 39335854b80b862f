"""``hpr-serve --quantization int8`` serves the tiny model with int8 weights, and edits still apply."""

from __future__ import annotations

from typing import Any

import httpx


def test_the_server_serves_int8_weights_with_edits(tiny_settings: Any) -> None:
    from tests.server.live_server import run_server

    settings = tiny_settings.model_copy(update={"quantization": "int8"})
    body = {
        "prompt": "Once upon",
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "hpr": {"adapter": "tiny", "layers": "all", "alpha": 2.0, "return_stats": True},
    }
    with run_server(settings) as live:
        assert live.app.state.runtime.engine.loaded.quantization == "int8"
        response = httpx.post(live.api_base + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"]["completion_tokens"] == 5
    stats = data["choices"][0]["hpr_stats"]
    assert set(stats) == {"0", "1", "2", "3"}
    prompt_tokens = data["usage"]["prompt_tokens"]
    assert all(s["tokens"] == prompt_tokens + 4 for s in stats.values())  # the edit ran on the int8 model
