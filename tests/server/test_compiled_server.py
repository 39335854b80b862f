"""``hpr-serve --compile-decode`` serves through the compiled decode step: the same answer and edit statistics as
the eager server, over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

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


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--compile-warmup", "--compile-warmup warms up the compiled decode step: it needs --compile-decode"),
        ("--compile-autotune", "--compile-autotune tunes the compiled decode step: it needs --compile-decode"),
    ],
)
def test_compile_options_need_the_compiled_step(flag: str, message: str, capsys: Any) -> None:
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(parse_settings(["--compile-decode", flag]), field) is True
    assert getattr(parse_settings([]), field) is False
    with pytest.raises(SystemExit) as exc:
        parse_settings([flag])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_warmed_up_server_compiles_nothing_for_default_requests(tiny_settings: Any, tmp_path: Any) -> None:
    """The graphs the base model and an adapter's defaults need (one row and two; the adapter's default stops
    editing after 2 tokens, so its unedited step too) are compiled before /health is ok; requests with those edits
    then add no graph and compile nothing."""
    import asyncio

    import torch

    from tests.conftest import make_random_adapter
    from tests.server.live_server import run_server

    adapter = make_random_adapter()
    adapter.config.default_alpha, adapter.config.default_scope, adapter.config.default_edit_tokens = 2.0, "all", 2
    path = adapter.save(tmp_path / "limited")
    settings = tiny_settings.model_copy(
        update={"compile_decode": True, "compile_warmup": True, "adapter": [f"limited={path}"], "compile_max_graphs": 8}
    )
    with run_server(settings) as live:
        assert httpx.get(live.base_url + "/health", timeout=30).status_code == 200
        # the warm-up's own requests are not traffic: the metrics start from zero
        assert "hpr_generation_tokens_total 0.0" in httpx.get(live.base_url + "/metrics", timeout=30).text
        compiled = live.app.state.runtime.engine.runner.compiled
        warmed = set(compiled.graphs)
        # no edit and the adapter's edit, each one row and several: the unedited graphs are shared
        assert len(warmed) == 4
        assert {key[2] for key in warmed} == {True, False}  # one row, and more
        assert len({key[0] for key in warmed}) == 2  # no edit, and the adapter's default layers
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]

        async def ask(n: int, model: str) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=300) as client:
                body = {"model": model, "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*(client.post(live.api_base + "/completions", json=body) for _ in range(n)))

        for n in (1, 3):
            for model in ("limited", live.app.state.runtime.base_id):
                assert all(r.status_code == 200 for r in asyncio.run(ask(n, model)))
        assert compiled.graphs == warmed
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing compiled after ready
        assert "hpr_generation_tokens_total 40.0" in httpx.get(live.base_url + "/metrics", timeout=30).text


def test_a_failed_warmup_stops_the_engine_and_reports_the_error(
    tiny_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm-up that fails leaves no engine running behind a server that will never be ready."""
    from server import warmup
    from tests.server.fake_engine import FakeEngine
    from tests.server.live_server import run_server

    engines: list[FakeEngine] = []

    def factory(settings: Any, registry: Any) -> FakeEngine:
        engines.append(FakeEngine(settings, registry))
        return engines[-1]

    async def failing(engine: Any, registry: Any) -> float:
        raise RuntimeError("injected warm-up failure")

    monkeypatch.setattr(warmup, "warm_up", failing)
    settings = tiny_settings.model_copy(update={"compile_decode": True, "compile_warmup": True})
    with pytest.raises(RuntimeError, match="injected warm-up failure"), run_server(settings, factory):
        pass
    assert len(engines) == 1 and engines[0].started and engines[0].stopped
