"""Every bad request gets a 4xx with the OpenAI error envelope — never a 5xx, never a bare FastAPI body."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server

USER = [{"role": "user", "content": "hi"}]


def assert_envelope(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def post(live: Any, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(live.api_base + path, timeout=30, **kwargs)


def test_malformed_json_is_400_invalid_json(fake_server: Any) -> None:
    response = post(
        fake_server, "/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, code="invalid_json")


def test_missing_body_is_400(fake_server: Any) -> None:
    assert_envelope(post(fake_server, "/completions"), 400)


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"null", b"3"])
def test_body_that_is_not_an_object_is_400(fake_server: Any, raw: bytes) -> None:
    response = post(fake_server, "/completions", content=raw, headers={"content-type": "application/json"})
    assert "JSON object" in assert_envelope(response, 400, code="invalid_json")["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "stream": "sometimes"}, "stream"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "layers": [1, "x"]}}, None),
        ({"messages": USER, "hpr": {"adapter": "tiny", "scope": "everywhere"}}, "hpr.scope"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "layers": [True]}}, None),
        ({"messages": USER, "hpr": "tiny"}, "hpr"),
    ],
)
def test_wrong_types_name_the_field(fake_server: Any, body: dict, param: str | None) -> None:
    error = assert_envelope(post(fake_server, "/chat/completions", json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER, "max_tokens": 0}, "max_tokens", None),
        ({"messages": USER, "top_p": 0}, "top_p", None),
        ({"messages": USER, "temperature": -1}, "temperature", None),
        ({"messages": USER, "presence_penalty": 3}, "presence_penalty", None),
        ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias", None),
        ({"messages": USER, "logit_bias": {"999999": 1}}, "logit_bias", None),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"messages": USER, "repetition_penalty": 5e-324}, "repetition_penalty", None),  # logits would overflow
        ({"messages": USER, "stop": ["", "x"]}, "stop", None),
        ({"messages": USER, "hpr": {"adapter": "tiny", "layers": "9"}}, "hpr.layers", "invalid_edit"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "layers": "3-1"}}, "hpr.layers", "invalid_edit"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "layers": "abc"}}, "hpr.layers", "string_pattern_mismatch"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "alpha": 4.5}}, "hpr.alpha", "less_than_equal"),
        ({"messages": USER, "hpr": {"adapter": "tiny", "alpha": -0.1}}, "hpr.alpha", "greater_than_equal"),
    ],
)
def test_out_of_range_values_are_400_naming_the_param(fake_server: Any, body: dict, param: str, code: str) -> None:
    assert_envelope(post(fake_server, "/chat/completions", json=body), 400, param=param, code=code)


def test_non_finite_alpha_is_400(fake_server: Any) -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "hpr": {"adapter": "tiny", "alpha": NaN}}'
    response = post(fake_server, "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(response, 400, param="hpr.alpha")


def test_unknown_model_is_404(fake_server: Any) -> None:
    assert_envelope(post(fake_server, "/chat/completions", json={"model": "gpt-9", "messages": USER}), 404, "model")
    assert_envelope(post(fake_server, "/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model")


def test_unknown_adapter_is_404_naming_hpr_adapter(fake_server: Any) -> None:
    body = {"messages": USER, "hpr": {"adapter": "nope"}}
    assert_envelope(post(fake_server, "/chat/completions", json=body), 404, "hpr.adapter", "adapter_not_found")


def test_prompt_longer_than_the_context_is_400(fake_server: Any) -> None:
    long_prompt = "x" * 300  # the tiny model's context is 256 tokens, one character = one token
    response = post(fake_server, "/completions", json={"prompt": long_prompt})
    assert_envelope(response, 400, "prompt", "context_length_exceeded")
    response = post(fake_server, "/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}]})
    assert_envelope(response, 400, "messages", "context_length_exceeded")


@pytest.mark.parametrize(
    ("prompt", "param"), [("", "prompt"), ([], "prompt"), ([[]], "prompt"), ([5, 99999], "prompt"), ([-1], "prompt")]
)
def test_bad_completion_prompts_are_400(fake_server: Any, prompt: Any, param: str) -> None:
    assert_envelope(post(fake_server, "/completions", json={"prompt": prompt}), 400, param)


def test_unsupported_completion_options_are_400(fake_server: Any) -> None:
    assert_envelope(post(fake_server, "/completions", json={"prompt": "a", "suffix": "b"}), 400, "suffix")
    assert_envelope(post(fake_server, "/completions", json={"prompt": "a", "best_of": 3}), 400, "best_of")


def test_unknown_fields_are_ignored(fake_server: Any) -> None:
    body = {"messages": USER, "max_tokens": 2, "tools_of_the_future": {"x": 1}, "response_format": {"type": "text"}}
    response = post(fake_server, "/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_unknown_route_and_method_use_the_envelope(fake_server: Any) -> None:
    assert_envelope(httpx.get(fake_server.base_url + "/v2/nothing"), 404, code="not_found")
    assert_envelope(httpx.delete(fake_server.api_base + "/models"), 405, code="method_not_allowed")
    assert_envelope(httpx.get(fake_server.api_base + "/chat/completions"), 405)


def test_too_large_body_is_413(tiny_settings: ServerSettings) -> None:
    settings = tiny_settings.model_copy(update={"max_body_bytes": 2048})
    with run_server(settings, FakeEngine) as live:
        body = {"messages": [{"role": "user", "content": "x" * 5000}]}
        assert_envelope(post(live, "/chat/completions", json=body), 413, code="body_too_large")

        def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}]}'

        response = post(live, "/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_envelope(response, 413)
        assert post(live, "/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200
