"""Turning request messages/prompts into token ids (chat template, tokenization) and checking them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import APIError
from server.protocol import ChatMessage
from server.serving.tools import ToolPlan, conversation, template_takes_tools


@dataclass(frozen=True)
class Prompt:
    text: str  # for echo; decoded when the request gave token ids
    ids: list[int]


def message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: ToolPlan | None = None) -> list[int]:
    """Apply the model's chat template (with the assistant generation prompt) and tokenize.

    ``developer`` messages (OpenAI's newer name for system) are passed as ``system``; with ``tools``, the tools are
    described in the system turn (:mod:`server.serving.tools`). The rendered text already holds any special
    tokens, so it is tokenized without adding more.
    """
    turns = conversation(messages, tools, message_text)
    extra: dict[str, Any] = {}
    if tools is not None and template_takes_tools(tokenizer):
        extra["tools"] = [t.model_dump(exclude_none=True) for t in tools.tools]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as exc:  # jinja2 errors (e.g. "roles must alternate"), or no template at all
        raise APIError(
            400, f"cannot apply the model's chat template: {exc}", param="messages", code="invalid_messages"
        ) from exc
    ids: list[int] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", param="messages", code="empty_prompt")
    return ids


def _check_ids(ids: list[int], vocab_size: int) -> list[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            400,
            f"token ids {bad[:8]} are outside the vocabulary [0, {vocab_size})",
            param="prompt",
            code="invalid_value",
        )
    return ids


def prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a completions request holds (without tokenizing anything)."""
    if isinstance(prompt, str) or all(isinstance(x, int) for x in prompt):
        return 1
    return len(prompt)


def completion_prompts(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], vocab_size: int
) -> list[Prompt]:
    """One :class:`Prompt` per prompt of a completions request (a string, strings, token ids, or lists of ids)."""
    items: list[str | list[int]] = []
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [[x for x in prompt if isinstance(x, int)]]
    else:
        items = [x for x in prompt if isinstance(x, (str, list))]
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = list(tokenizer(item, add_special_tokens=True)["input_ids"])
            out.append(Prompt(text=item, ids=ids))
        else:
            ids = _check_ids(list(item), vocab_size)
            out.append(Prompt(text=tokenizer.decode(ids), ids=ids))
        if not out[-1].ids:
            raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    return out


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """The prompt must fit the context and, when generating, leave room for at least one token.

    Generation that would run past the context is cut there and ends with ``finish_reason: "length"``.
    """
    needed = prompt_tokens + (1 if max_tokens > 0 else 0)
    if needed > max_model_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_tokens} "
            f"tokens{' and generation needs at least 1 more' if max_tokens > 0 else ''}",
            param=param,
            code="context_length_exceeded",
        )
