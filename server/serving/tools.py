"""Tool calls (``tools`` / ``tool_choice``) in one generic format, constrained by a grammar, for every model.

**The format** (documented in docs/server.md, "Structured output and tool calls"). The tools are described in the
system turn, as JSON, with how to answer; the model's answer is one compact JSON object:

- ``{"tool_call": {"name": "<function>", "arguments": {...}}}`` to call a function;
- ``{"response": "<text>"}`` to answer in words (``tool_choice: auto`` only).

The answer is constrained to exactly that: with ``required`` or a named function only the first form (with only
that function), so a call is always well formed and its arguments match the function's JSON Schema; with ``auto``
either form, the model choosing. The server turns the JSON back into OpenAI's ``tool_calls`` (or ``content``), so a
client never sees it. Past turns are rendered the same way: an assistant turn's ``tool_calls`` as the JSON it would
have produced, a ``tool`` turn as a turn of role ``tool``. A chat template that takes ``tools`` (the model was
trained on its own format) gets them too, for the model to read; the answer is still the generic JSON.
llama.cpp's generic tool-call handler works alike.

One call per choice (``parallel_tool_calls`` is accepted and has no effect).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessage, ChatTool, FunctionCall, NamedToolChoice, ToolCall
from server.serving.structured import check_schema


@dataclass(frozen=True)
class ToolPlan:
    """The tools of one request: what the model is told, and the schema its answer must match."""

    tools: list[ChatTool]  # the ones it may call
    choice: Literal["auto", "required", "named"]
    schema: dict[str, Any]

    def instructions(self) -> str:
        described = [
            {"name": t.function.name, "description": t.function.description or "",
             "parameters": t.function.parameters or {"type": "object"}}
            for t in self.tools
        ]  # fmt: skip
        call = '{"tool_call": {"name": <function name>, "arguments": <its arguments>}}'
        text = f"You can call these functions:\n{json.dumps(described)}\n"
        if self.choice == "auto":
            return text + f'To call one, answer only {call}. To answer directly, answer only {{"response": <text>}}.'
        return text + f"Call one: answer only {call}."


def plan_tools(request: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool plan (None: no tools, or ``tool_choice: none``); a 400 for a choice that names a function
    the request does not define, or asks for a call without tools."""
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise APIError(
            400, "tool_choice asks for a tool call, but the request has no tools", param="tool_choice",
            code="invalid_value",
        )  # fmt: skip
    for i, tool in enumerate(tools):  # each function's schema, named where the client wrote it
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, param=f"tools[{i}].function.parameters")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same function name", param="tools", code="invalid_value")
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise APIError(
                400, f"tool_choice names function {choice.function.name!r}, which is not among the tools {names}",
                param="tool_choice.function.name", code="invalid_value",
            )  # fmt: skip
        return ToolPlan(chosen, "named", _call_schema(chosen))
    if choice == "required":
        return ToolPlan(tools, "required", _call_schema(tools))
    response = {
        "type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
        "additionalProperties": False,
    }  # fmt: skip
    return ToolPlan(tools, "auto", {"anyOf": [_call_schema(tools), response]})


def _call_schema(tools: list[ChatTool]) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {
        "type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
        "required": ["tool_call"], "additionalProperties": False,
    }  # fmt: skip


def conversation(messages: list[ChatMessage], plan: ToolPlan | None, text: Any) -> list[dict[str, Any]]:
    """The messages as a chat template takes them (``text`` gives a message's text), with the tools described in
    the system turn and past tool calls in the generic format."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        content = text(m)
        if m.role == "assistant" and m.tool_calls:
            calls = [{"tool_call": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]  # fmt: skip
            content = "\n".join(json.dumps(c, separators=(",", ":")) for c in calls)
        turns.append({"role": role, "content": content})
    if plan is not None:
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{plan.instructions()}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": plan.instructions()})
    return turns


def _arguments(arguments: str) -> Any:
    """A past call's arguments (OpenAI sends a JSON string) as the JSON value; text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads a ``tools`` variable (then it also gets the tools, in its own format)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None
    tool_calls: list[ToolCall] | None


def parse_answer(text: str) -> ParsedAnswer:
    """A choice's text in the generic format → OpenAI's content or tool calls; text that is not the format (cut by
    ``max_tokens``) stays content, as it is."""
    try:
        value = json.loads(text)
    except ValueError:
        return ParsedAnswer(_partial_response(text), None)
    if isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
        call = value["tool_call"]
        arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        tool_call = ToolCall(
            id=f"call_{secrets.token_hex(12)}", function=FunctionCall(name=call["name"], arguments=arguments)
        )
        return ParsedAnswer(None, [tool_call])
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return ParsedAnswer(value["response"], None)
    return ParsedAnswer(text, None)


RESPONSE_PREFIX = '{"response": "'


def _partial_response(text: str) -> str:
    """The words of a ``{"response": ...}`` answer cut short by ``max_tokens``; other text as it is."""
    if not text.startswith(RESPONSE_PREFIX):
        return text
    body = text[len(RESPONSE_PREFIX) :]
    for cut in (body, body[:-1], body[:-2], body[:-3], body[:-4], body[:-5]):  # a cut inside an escape (\u00e9)
        try:
            words = json.loads(f'"{cut}"')
        except ValueError:
            continue
        return str(words)
    return text
