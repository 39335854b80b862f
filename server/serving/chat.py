"""``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request

from server.engine.types import FinishReason, GenerationOutput, GenerationRequest, OutputConstraint
from server.errors import APIError
from server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    HPRApplied,
    ToolCallDelta,
    UsageInfo,
)
from server.runtime import Runtime
from server.serving.edits import ResolvedEdit, resolve_edit, stats_payload
from server.serving.generation import collect_all, merge_streams, open_streams
from server.serving.logprobs import chat_logprobs
from server.serving.prompts import check_context, render_chat
from server.serving.sampling import for_choice, sampling_params
from server.serving.sse import chunk_json, new_id, now, with_error_frame
from server.serving.structured import compile_constraint, response_format_constraint
from server.serving.tools import parse_answer, plan_tools


class ServingChat:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def create(self, request: ChatCompletionRequest, raw: Request) -> ChatCompletionResponse | AsyncIterator[str]:
        """A full response, or (``stream: true``) an iterator of SSE data payloads ending with ``[DONE]``.

        Admission comes first: a request the server cannot hold is refused before the chat template runs.
        """
        ticket = self.runtime.admission.admit(request.n)
        try:
            result = await self._create(request, raw)
        except BaseException:
            ticket.release()
            raise
        if isinstance(result, ChatCompletionResponse):
            ticket.release()
            return result
        return ticket.hold_until_done(result)

    async def _create(
        self, request: ChatCompletionRequest, raw: Request
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        rt = self.runtime
        edit = resolve_edit(rt, request.model, request.hpr)
        tools = plan_tools(request)
        if tools is not None and request.response_format is not None and request.response_format.type != "text":
            raise APIError(
                400, "response_format and a tool call cannot both constrain the answer: send one of them",
                param="response_format", code="invalid_value",
            )  # fmt: skip
        constraint: OutputConstraint | None
        if tools is not None:
            constraint = await compile_constraint(rt.grammars, "json_schema", tools.schema, param="tools")
        else:
            constraint = await response_format_constraint(rt.grammars, request.response_format)
        prompt_ids = render_chat(rt.tokenizer, request.messages, tools)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        check_context(len(prompt_ids), 1 if max_tokens is None else max_tokens, rt.max_model_len, "messages")
        if max_tokens is None:
            max_tokens = rt.max_model_len - len(prompt_ids)  # OpenAI: unlimited, i.e. up to the context
        params = sampling_params(
            request,
            max_tokens=max_tokens,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            prompt_logprobs=False,
            vocab_size=rt.vocab_size,
        )
        response_id = new_id("chatcmpl")
        requests = [
            GenerationRequest(
                request_id=f"{response_id}-{i}",
                prompt_ids=prompt_ids,
                sampling=for_choice(params, i),
                edit=edit.spec,
                return_stats=edit.return_stats,
                constraint=constraint,
            )
            for i in range(request.n)
        ]
        model = request.model or rt.base_id
        if request.stream:
            iterators = await open_streams(rt.engine, requests, raw)
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            frames = self._stream(
                response_id, model, edit, len(prompt_ids), iterators, include_usage, tools is not None
            )
            return with_error_frame(frames)
        results = await collect_all(rt.engine, requests, raw)
        choices = []
        for i, r in enumerate(results):
            message, finish_reason = _message(r.text, r.finish_reason, tools is not None)
            choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=message,
                    logprobs=chat_logprobs(r.logprobs) if request.logprobs else None,
                    finish_reason=finish_reason,
                    hpr_stats=stats_payload(r.edit_stats),
                )
            )
        completion_tokens = sum(r.completion_tokens for r in results)
        return ChatCompletionResponse(
            id=response_id,
            created=now(),
            model=model,
            choices=choices,
            usage=UsageInfo.count(len(prompt_ids), completion_tokens),
            hpr=edit.applied,
        )

    async def _stream(
        self,
        response_id: str,
        model: str,
        edit: ResolvedEdit,
        prompt_tokens: int,
        iterators: list[AsyncIterator[GenerationOutput]],
        include_usage: bool,
        tool_format: bool = False,
    ) -> AsyncIterator[str]:
        """SSE payloads. With tools, a choice's answer is JSON in the generic format until it ends, so its text is
        held back and sent whole at the end, as content or as one tool call (the logprobs still stream)."""
        created = now()
        held = [""] * len(iterators)

        def chunk(
            choices: list[ChatCompletionChunkChoice], hpr: HPRApplied | None = None, usage: UsageInfo | None = None
        ) -> str:
            return chunk_json(
                ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, hpr=hpr, usage=usage)
            )

        for i in range(len(iterators)):
            role = ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            yield chunk([role], hpr=edit.applied) if i == 0 else chunk([role])
        completion_tokens = [0] * len(iterators)
        async for i, out in merge_streams(iterators):
            completion_tokens[i] = out.completion_tokens
            if not (out.text or out.logprobs or out.finish_reason):
                continue
            delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
            finish_reason: ChatFinishReason | None = out.finish_reason
            if tool_format:
                held[i] += out.text
                delta = DeltaMessage()
                if out.finish_reason is not None:
                    message, finish_reason = _message(held[i], out.finish_reason, True)
                    calls = message.tool_calls or []
                    delta = DeltaMessage(
                        content=message.content,
                        tool_calls=[ToolCallDelta(index=k, id=c.id, type=c.type, function=c.function)
                                    for k, c in enumerate(calls)] or None,
                    )  # fmt: skip
            if tool_format and finish_reason is None and not out.logprobs:
                continue  # held back: nothing to send yet
            choice = ChatCompletionChunkChoice(
                index=i,
                delta=delta,
                logprobs=chat_logprobs(out.logprobs) if out.logprobs else None,
                finish_reason=finish_reason,
                hpr_stats=stats_payload(out.edit_stats),
            )
            yield chunk([choice])
        if include_usage:
            total = sum(completion_tokens)
            usage = UsageInfo.count(prompt_tokens, total)
            yield chunk([], usage=usage)


ChatFinishReason = Literal["stop", "length", "tool_calls"]


def _message(
    text: str, finish_reason: FinishReason | None, tool_format: bool
) -> tuple[ChatResponseMessage, ChatFinishReason | None]:
    """A choice's message: its text, or (with tools) the generic format's answer turned back into OpenAI's shape."""
    if not tool_format:
        return ChatResponseMessage(content=text), finish_reason
    answer = parse_answer(text)
    if answer.tool_calls and finish_reason == "stop":
        return ChatResponseMessage(content=None, tool_calls=answer.tool_calls), "tool_calls"
    return ChatResponseMessage(content=answer.content), finish_reason
