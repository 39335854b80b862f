"""Structured output and tool calls over HTTP with the openai SDK (issue 30).

With SmolLM2: ``parse()`` with pydantic models gives valid objects for the base model and under edits up to alpha 4
on every layer and position, where the same requests without a constraint are not JSON; a get_weather tool
request gets a valid call. With the scripted fake engine: each bad request is a 400 that never reaches the engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

from bench.structured_validity import Weather
from bench.structured_validity import messages as ask
from hpr.errors import ModelLoadError
from hpr.model import EMBEDDED_MODEL_ID, embedded_gguf_path
from server.settings import ServerSettings
from tests.conftest import make_random_adapter
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_errors import assert_envelope

CITIES = ["Paris", "Tokyo", "Cairo", "Lima"]
ALPHAS = [0.0, 1.0, 2.0, 4.0]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip


def edit(alpha: float) -> dict[str, Any]:
    return {"hpr": {"alpha": alpha, "scope": "all", "layers": "all"}} if alpha else {}


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """SmolLM2 with ``rand``: a random HPR adapter on all 30 layers (at alpha 1 on every position its free text
    is gibberish)."""
    try:
        embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    adapter = make_random_adapter(hidden=576, layers=30, trained=list(range(30)))
    adapter.config.base_model = EMBEDDED_MODEL_ID
    directory = adapter.save(tmp_path_factory.mktemp("so-adapter") / "rand")
    settings = ServerSettings(adapter=[f"rand={directory}"], device="cpu", dtype="float32", max_batch_size=16)
    with run_server(settings) as live:
        yield openai.OpenAI(base_url=live.api_base, api_key="x", max_retries=0, timeout=300)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_parse_gives_valid_objects_under_every_edit(smol: openai.OpenAI, alpha: float) -> None:
    for city in CITIES:
        completion = smol.chat.completions.parse(
            model="rand", messages=ask(city), response_format=Weather, max_tokens=60, temperature=0,  # type: ignore[arg-type]
            extra_body=edit(alpha),
        )  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Weather)
        assert choice.message.parsed == Weather.model_validate_json(choice.message.content or "")


def test_without_the_constraint_the_same_requests_are_not_json(smol: openai.OpenAI) -> None:
    """What the constraint is for: unconstrained, the base model answers in prose and the edit at alpha 1 in broken
    text, so not one of them parses (measured per alpha in docs/quality.md)."""
    for alpha in (0.0, 1.0):
        for city in CITIES:
            text = smol.chat.completions.create(
                model="rand", messages=ask(city), max_tokens=60, temperature=0, extra_body=edit(alpha)  # type: ignore[arg-type]
            ).choices[0].message.content  # fmt: skip
            with pytest.raises(ValidationError):
                Weather.model_validate_json(text or "")


def test_json_object_and_sampling_give_valid_json(smol: openai.OpenAI) -> None:
    for seed in range(3):
        completion = smol.chat.completions.create(
            model="rand", messages=ask("Oslo"), response_format={"type": "json_object"}, max_tokens=120,
            temperature=1.0, seed=seed, extra_body=edit(1.0),
        )  # fmt: skip
        choice = completion.choices[0]
        if choice.finish_reason == "stop":  # an object without a schema has no bound: it may run to max_tokens
            assert isinstance(json.loads(choice.message.content or ""), dict)


def test_the_embedded_model_calls_get_weather(smol: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    for choice_param in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        completion = smol.chat.completions.create(
            model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER_TOOL], tool_choice=choice_param,  # type: ignore[arg-type,list-item]
            max_tokens=60, temperature=0,
        )  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
    auto = smol.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER_TOOL], max_tokens=80, temperature=0  # type: ignore[arg-type,list-item]
    ).choices[0]  # fmt: skip
    if auto.message.tool_calls:  # auto: the model chooses; either way the answer is well formed
        assert auto.finish_reason == "tool_calls" and auto.message.tool_calls[0].function.name == "get_weather"
    else:  # words, not the generic format's JSON, even when max_tokens cuts them
        assert auto.message.content and not auto.message.content.startswith("{")


def test_a_streamed_tool_call_arrives_as_one_delta_and_the_conversation_goes_on(smol: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    stream = smol.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,  # type: ignore[arg-type,list-item]
        temperature=0, stream=True,
    )  # fmt: skip
    calls = [d for chunk in stream for c in chunk.choices for d in (c.delta.tool_calls or [])]
    (call,) = calls
    assert call.function is not None and call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
         "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "conditions": "sunny"}'},
    ]  # fmt: skip
    answer = smol.chat.completions.create(
        model=EMBEDDED_MODEL_ID, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=40,  # type: ignore[arg-type,list-item]
        temperature=0,
    ).choices[0]  # fmt: skip
    assert answer.message.content and not answer.message.tool_calls


# --- bad input: a 400, and the engine never sees it -----------------------------------------------------------------


class CountingEngine(FakeEngine):
    calls = 0
    last: Any = None

    def generate(self, request: Any) -> Any:
        CountingEngine.calls += 1
        CountingEngine.last = request
        return super().generate(request)


@pytest.fixture(scope="module")
def counting_server(tiny_settings: ServerSettings) -> Iterator[Any]:
    with run_server(tiny_settings, CountingEngine) as live:
        yield live


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {
            "type": "object", "properties": {"age": {"type": "integer", "minimum": "ten"}}}}}},
         "response_format.json_schema.schema", r"invalid at \$\.properties\.age\.minimum"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
         "response_format.json_schema.schema", "cannot be compiled"),
        ({"response_format": {"type": "yaml"}}, "response_format", "does not match any of the expected tags"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
         "tool_choice.function.name", "'get_time', which is not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", "has no tools"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools", "same function name"),
        ({"tools": [WEATHER_TOOL], "response_format": SCHEMA_FORMAT}, "response_format", "send one of them"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
         "tools[0].function.parameters", r"invalid at \$\.type"),
    ],
)  # fmt: skip
def test_bad_structured_requests_are_400_before_the_engine(
    counting_server: Any, body: dict[str, Any], param: str, message: str
) -> None:
    before = CountingEngine.calls
    response = httpx.post(counting_server.api_base + "/chat/completions", json={**CHAT, **body})
    error = assert_envelope(response, 400)
    assert error["param"] == param
    assert re.search(message, error["message"]), error["message"]
    assert CountingEngine.calls == before


def test_completions_take_a_response_format(counting_server: Any) -> None:
    before = CountingEngine.calls
    body = {"prompt": "x", "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object", "properties": {"a": {"type": "boolean"}}}}}}  # fmt: skip
    assert httpx.post(counting_server.api_base + "/completions", json=body).status_code == 200
    assert CountingEngine.calls == before + 1
    constraint = CountingEngine.last.constraint
    assert constraint.kind == "json_schema" and json.loads(constraint.schema)["properties"] == {
        "a": {"type": "boolean"}
    }


def test_answers_in_the_generic_format_become_openais_shape() -> None:
    from server.serving.tools import parse_answer

    call = parse_answer('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}')
    assert call.content is None and call.tool_calls is not None
    assert (call.tool_calls[0].function.name, json.loads(call.tool_calls[0].function.arguments)) == (
        "get_weather", {"city": "Paris"},
    )  # fmt: skip
    assert parse_answer('{"response": "It is sunny."}') == parse_answer('{"response": "It is sunny."}')
    assert parse_answer('{"response": "It is sunny."}').content == "It is sunny."
    assert parse_answer('{"response": "Caf\\u00e9 au l').content == "Café au l"  # cut by max_tokens
    assert parse_answer('{"response": "Caf\\u00').content == "Caf"  # cut inside an escape
    assert parse_answer("plain words").content == "plain words"


def test_a_template_that_takes_tools_gets_them_and_the_system_turn_describes_them() -> None:
    from server.protocol import ChatCompletionRequest
    from server.serving.prompts import render_chat
    from server.serving.tools import plan_tools
    from tests.server.conftest import make_tiny_tokenizer

    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER_TOOL], "tool_choice": "required"}
    )
    plan = plan_tools(request)
    tokenizer = make_tiny_tokenizer()
    plain = tokenizer.decode(render_chat(tokenizer, request.messages, plan))
    assert "get_weather" in plain and '{"tool_call": {"name": <function name>' in plain  # the system turn
    tokenizer.chat_template = "{% for t in tools %}[tool {{ t.function.name }}]{% endfor %}" + tokenizer.chat_template
    with_tools = tokenizer.decode(render_chat(tokenizer, request.messages, plan))
    assert with_tools.startswith("[tool get_weather]") and with_tools.endswith(plain)
