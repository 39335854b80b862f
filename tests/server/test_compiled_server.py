"""``hpr-serve --compile-decode`` serves through the compiled decode step: the same answer and edit statistics as
the eager server, over HTTP."""

from __future__ import annotations

from typing import Any

import httpx

from server.cli import parse_settings


def test_the_flag_parses_and_defaults_off() -> None:
    assert parse_settings([]).compile_decode is False
    assert parse_settings(["--compile-decode"]).compile_decode is True
    assert parse_settings([]).compile_max_graphs == 4
    assert parse_settings(["--compile-max-graphs", "2"]).compile_max_graphs == 2


def test_the_compiled_server_answers_as_the_eager_one(tiny_settings: Any) -> None:
    from tests.server.live_server import run_server

    body = {
        "prompt": "Once upon",
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 2,
        "hpr": {"adapter": "tiny", "layers": "all", "alpha": 2.0, "return_stats": True},
    }
    answers = []
    for compiled in (False, True):
        settings = tiny_settings.model_copy(update={"compile_decode": compiled})
        with run_server(settings) as live:
            assert (live.app.state.runtime.engine.runner.compiled is not None) is compiled
            response = httpx.post(live.api_base + "/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        answers.append(response.json()["choices"][0])
    eager, compiled_answer = answers
    assert compiled_answer["text"] == eager["text"]
    assert compiled_answer["hpr_stats"].keys() == eager["hpr_stats"].keys() == {"0", "1", "2", "3"}
    for layer, want in eager["hpr_stats"].items():
        got = compiled_answer["hpr_stats"][layer]
        assert (got["tokens"], got["rotated"]) == (want["tokens"], want["rotated"])
        assert abs(got["mean_angle"] - want["mean_angle"]) < 1e-5
    for a, b in zip(eager["logprobs"]["token_logprobs"], compiled_answer["logprobs"]["token_logprobs"], strict=True):
        assert abs(a - b) < 1e-4
