"""Hardening: refusals before any tokenizing, X-Request-Id, nothing leaked (paths, docs without a key), strict types."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpx
import pytest

import server.serving.chat
import server.serving.completion
from server.app import create_app
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

JSON_TYPE = {"Content-Type": "application/json"}


def slow_engine(settings: ServerSettings, registry: Any) -> FakeEngine:
    return FakeEngine(settings, registry, step_delay=0.05)


def test_over_capacity_is_refused_before_templating_or_tokenizing(
    tiny_settings: ServerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"render_chat": 0, "completion_prompts": 0}

    def counting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(server.serving.chat, "render_chat", counting("render_chat", server.serving.chat.render_chat))
    monkeypatch.setattr(
        server.serving.completion,
        "completion_prompts",
        counting("completion_prompts", server.serving.completion.completion_prompts),
    )
    settings = tiny_settings.model_copy(update={"max_batch_size": 1, "max_queue": 1})
    with run_server(settings, slow_engine) as live:
        body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True}
        busy = [
            threading.Thread(target=httpx.post, args=(live.api_base + "/completions",), kwargs={"json": body})
            for _ in range(2)
        ]
        for thread in busy:
            thread.start()
        deadline = time.monotonic() + 10
        while live.app.state.runtime.admission.held < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        tokenized = dict(calls)
        assert tokenized["completion_prompts"] == 2
        response = httpx.post(live.api_base + "/chat/completions", json=CHAT)
        assert_envelope(response, 429, code="queue_full")
        assert response.headers["retry-after"] == "1"
        assert_envelope(httpx.post(live.api_base + "/completions", json={"prompt": "y", "stream": True}), 429)
        assert calls == tokenized  # neither refusal reached the chat template nor the tokenizer
        # Full: refused before the body is read, so even a body that is not JSON is told to retry.
        garbled = httpx.post(live.api_base + "/chat/completions", content=b"{not json", headers=JSON_TYPE)
        assert_envelope(garbled, 429, code="queue_full")
        for thread in busy:
            thread.join()
        assert live.app.state.runtime.admission.held == 0  # every ticket was given back
        assert httpx.post(live.api_base + "/chat/completions", json=CHAT).status_code == 200
        assert calls["render_chat"] == 1
        # Not full: the same body is read and refused for what it is.
        garbled = httpx.post(live.api_base + "/chat/completions", content=b"{not json", headers=JSON_TYPE)
        assert assert_envelope(garbled, 400)["code"] != "queue_full" and "json" in garbled.text.lower()


def test_n_beyond_what_the_server_can_hold_is_400_saying_why(tiny_settings: ServerSettings) -> None:
    settings = tiny_settings.model_copy(update={"max_batch_size": 2, "max_queue": 3})
    with run_server(settings, FakeEngine) as live:
        error = assert_envelope(httpx.post(live.api_base + "/chat/completions", json={**CHAT, "n": 6}), 400)
        assert error["param"] == "n" and "max_batch_size 2 + max_queue 3" in error["message"]
        prompts = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}
        assert_envelope(httpx.post(live.api_base + "/completions", json=prompts), 400)
        assert httpx.post(live.api_base + "/chat/completions", json={**CHAT, "n": 5}).status_code == 200


def test_request_id_is_echoed_or_generated_on_every_answer(fake_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.access")
    mine = {"X-Request-Id": "client-id-42"}
    ok = httpx.post(fake_server.api_base + "/chat/completions", json=CHAT, headers=mine)
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id-42"
    generated = httpx.post(fake_server.api_base + "/chat/completions", json=CHAT)
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.headers["x-request-id"] != httpx.get(fake_server.base_url + "/health").headers["x-request-id"]
    bad = httpx.post(fake_server.api_base + "/chat/completions", json={"messages": []}, headers=mine)
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "client-id-42"
    assert httpx.get(fake_server.base_url + "/nowhere", headers=mine).headers["x-request-id"] == "client-id-42"
    with httpx.stream(
        "POST", fake_server.api_base + "/chat/completions", json={**CHAT, "stream": True}, headers=mine
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-request-id"] == "client-id-42"
        assert "[DONE]" in stream.read().decode()
    unsafe = httpx.get(fake_server.base_url + "/health", headers={"X-Request-Id": "a b"})
    assert unsafe.headers["x-request-id"] != "a b"  # spaces could forge log fields: replaced
    logged = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert any('"POST /v1/chat/completions" 200' in m and "request_id=client-id-42" in m for m in logged)
    assert any('"POST /v1/chat/completions" 400' in m and "request_id=client-id-42" in m for m in logged)


def test_models_show_directory_names_not_paths(fake_server: Any, tiny_settings: ServerSettings) -> None:
    cards = {card["id"]: card for card in httpx.get(fake_server.api_base + "/models").json()["data"]}
    assert cards["tiny"]["root"] == "tiny"
    assert cards["tiny-llama"]["root"] == "tiny-llama"
    assert "/" not in str([card["root"] for card in cards.values()])


def test_with_a_key_the_docs_need_it_too(tiny_settings: ServerSettings) -> None:
    settings = tiny_settings.model_copy(update={"api_key": ["sk-right"]})
    with run_server(settings, FakeEngine) as live:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_envelope(httpx.get(live.base_url + path), 401)
            keyed = httpx.get(live.base_url + path, headers={"Authorization": "Bearer sk-right"})
            assert keyed.status_code == 200, path


def test_no_docs_turns_them_off(tiny_settings: ServerSettings) -> None:
    with run_server(tiny_settings.model_copy(update={"docs": False}), FakeEngine) as live:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_envelope(httpx.get(live.base_url + path), 404)
        assert httpx.get(live.base_url + "/health").status_code == 200


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [("0.0.0.0", [], True), ("::", [], True), ("0.0.0.0", ["sk"], False), ("127.0.0.1", [], False),
     ("localhost", [], False), ("::1", [], False)],
)  # fmt: skip
def test_warning_when_binding_beyond_loopback_without_a_key(
    tiny_settings: ServerSettings, caplog: pytest.LogCaptureFixture, host: str, keys: list[str], warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="server.auth")
    create_app(tiny_settings.model_copy(update={"host": host, "api_key": keys}))
    assert any("without an API key" in r.getMessage() for r in caplog.records) == warned


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [[False]]}, "prompt"),  # a boolean is no token id
        ({"prompt": [True, 3]}, "prompt"),
        ({"prompt": "x", "stop_token_ids": ["2"]}, "stop_token_ids[0]"),
        ({"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids[0]"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": ""}, "prompt"),  # the schema says a prompt has at least one character
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "hpr": {"adapter": "tiny", "layers": "1-"}}, "hpr.layers"),
    ],
)
def test_wrong_types_are_400_naming_the_field(fake_server: Any, body: dict[str, Any], param: str) -> None:
    error = assert_envelope(httpx.post(fake_server.api_base + "/completions", json=body), 400)
    assert error["param"] == param


def test_integral_numbers_count_as_integers(fake_server: Any) -> None:
    body = {"prompt": [[7.0, 8]], "max_tokens": 2.0, "n": 1.0}  # JSON Schema's integers include 2.0
    assert httpx.post(fake_server.api_base + "/completions", json=body).status_code == 200


def test_any_integer_seed_is_taken_modulo_2_64(fake_server: Any) -> None:
    for seed in (2**63, -(2**63) - 1, 2**70, 9.223372036854776e18):
        body = {"prompt": "x", "max_tokens": 1, "seed": seed}
        assert httpx.post(fake_server.api_base + "/completions", json=body).status_code == 200, seed
    seen = fake_server.engine.requests[-4:]
    assert [r.sampling.seed for r in seen] == [-(2**63), 2**63 - 1, 0, -(2**63)]


def test_openapi_states_the_loaded_models_limits(fake_server: Any) -> None:
    schema = httpx.get(fake_server.base_url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "x-hpr-bound" not in str(schema)
    request = components["CompletionRequest"]["anyOf"][0]["properties"]
    assert '"maximum": 101' in str(request["stop_token_ids"]).replace("'", '"')  # vocab of 102 tokens
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_max_tokens_0_without_scoring_finishes_at_once(fake_server: Any) -> None:
    before = len(fake_server.engine.requests)
    body = {"prompt": ["ab", "cd"], "max_tokens": 0, "n": 2}
    plain = httpx.post(fake_server.api_base + "/completions", json=body).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in plain["choices"]] == [
        (i, "", "length") for i in range(4)
    ]
    assert plain["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    echoed = httpx.post(fake_server.api_base + "/completions", json={"prompt": "ab", "max_tokens": 0, "echo": True})
    assert echoed.json()["choices"][0]["text"] == "ab"
    stream = httpx.post(fake_server.api_base + "/completions", json={"prompt": "ab", "max_tokens": 0, "stream": True})
    assert stream.text.count('"finish_reason":"length"') == 1 and stream.text.rstrip().endswith("[DONE]")
    assert len(fake_server.engine.requests) == before  # the engine never saw them


def test_no_docs_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import parse_settings

    assert parse_settings([]).docs is True
    assert parse_settings(["--no-docs"]).docs is False
    monkeypatch.setenv("HPR_DOCS", "false")
    assert parse_settings([]).docs is False


def test_a_model_without_a_chat_template_refuses_chat_and_still_completes(fake_server: Any) -> None:
    """A GGUF or directory with no chat template (issue 28): chat is a 400 saying so; completions still work."""
    tokenizer = fake_server.app.state.runtime.info.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        error = assert_envelope(httpx.post(fake_server.api_base + "/chat/completions", json=CHAT), 400)
        assert error["param"] == "messages" and "chat template" in error["message"]
        completion = httpx.post(fake_server.api_base + "/completions", json={"prompt": "x", "max_tokens": 1})
        assert completion.status_code == 200
    finally:
        tokenizer.chat_template = template
