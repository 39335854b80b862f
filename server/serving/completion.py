"""``POST /v1/completions`` (legacy completions; how evaluation harnesses score text through an API).

``echo: true`` + ``logprobs: k`` + ``max_tokens: 0`` returns the prompt's token logprobs and generates nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi import Request

from server.engine.types import GenerationOutput, GenerationRequest, TokenLogprob
from server.errors import APIError
from server.protocol import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from server.runtime import Runtime
from server.serving.edits import ResolvedEdit, resolve_edit, stats_payload
from server.serving.generation import ChoiceResult, collect_all, merge_streams, open_streams
from server.serving.logprobs import completion_logprobs
from server.serving.prompts import Prompt, check_context, completion_prompts, prompt_count
from server.serving.sampling import for_choice, sampling_params
from server.serving.sse import chunk_json, new_id, now, with_error_frame
from server.serving.structured import response_format_constraint


class ServingCompletion:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _first_token(self, prompt: Prompt) -> str:
        return str(self.runtime.tokenizer.decode(prompt.ids[:1]))

    async def create(self, request: CompletionRequest, raw: Request) -> CompletionResponse | AsyncIterator[str]:
        """A full response, or (``stream: true``) an iterator of SSE data payloads ending with ``[DONE]``.

        Admission comes first: a request the server cannot hold is refused before any prompt is tokenized.
        """
        choices = prompt_count(request.prompt) * request.n
        if choices > MAX_PROMPTS:
            raise APIError(400, f"prompts × n must be at most {MAX_PROMPTS}", param="n", code="invalid_value")
        ticket = self.runtime.admission.admit(choices)
        try:
            result = await self._create(request, raw)
        except BaseException:
            ticket.release()
            raise
        if isinstance(result, CompletionResponse):
            ticket.release()
            return result
        return ticket.hold_until_done(result)

    async def _create(self, request: CompletionRequest, raw: Request) -> CompletionResponse | AsyncIterator[str]:
        rt = self.runtime
        edit = resolve_edit(rt, request.model, request.hpr)
        constraint = await response_format_constraint(rt.grammars, request.response_format)
        prompts = completion_prompts(rt.tokenizer, request.prompt, rt.vocab_size)
        for prompt in prompts:
            check_context(len(prompt.ids), 1 if request.max_tokens is None else request.max_tokens, rt.max_model_len,
                          "prompt")  # fmt: skip
        score_prompt = request.echo and request.logprobs is not None
        if request.max_tokens == 0 and not score_prompt:
            return self._nothing_to_generate(request, edit, prompts)
        base = sampling_params(
            request,
            max_tokens=request.max_tokens if request.max_tokens is not None else 1,
            logprobs=request.logprobs,
            prompt_logprobs=score_prompt,
            vocab_size=rt.vocab_size,
        )
        response_id = new_id("cmpl")
        requests: list[GenerationRequest] = []
        owners: list[Prompt] = []  # the prompt of each choice (choice index = prompt index × n + sample)
        for p, prompt in enumerate(prompts):
            for j in range(request.n):
                params = for_choice(base, j)
                if request.max_tokens is None:
                    params = dataclasses.replace(params, max_tokens=rt.max_model_len - len(prompt.ids))
                requests.append(
                    GenerationRequest(
                        request_id=f"{response_id}-{p * request.n + j}",
                        prompt_ids=prompt.ids,
                        sampling=params,
                        edit=edit.spec,
                        return_stats=edit.return_stats,
                        constraint=constraint,
                    )
                )
                owners.append(prompt)
        model = request.model or rt.base_id
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if request.stream:
            iterators = await open_streams(rt.engine, requests, raw)
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            frames = self._stream(request, response_id, model, edit, owners, prompt_tokens, iterators, include_usage)
            return with_error_frame(frames)
        results = await collect_all(rt.engine, requests, raw)
        choices = [self._choice(i, request, owners[i], r) for i, r in enumerate(results)]
        completion_tokens = sum(r.completion_tokens for r in results)
        return CompletionResponse(
            id=response_id,
            created=now(),
            model=model,
            choices=choices,
            usage=UsageInfo.count(prompt_tokens, completion_tokens),
            hpr=edit.applied,
        )

    def _nothing_to_generate(
        self, request: CompletionRequest, edit: ResolvedEdit, prompts: list[Prompt]
    ) -> CompletionResponse | AsyncIterator[str]:
        """``max_tokens: 0`` without prompt scoring: every choice is finished before it starts (the prompt when
        echoing, else empty text; ``finish_reason: "length"``). No engine work."""
        model = request.model or self.runtime.base_id
        response = CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=model,
            choices=[
                self._choice(p * request.n + j, request, prompt, ChoiceResult(finish_reason="length"))
                for p, prompt in enumerate(prompts)
                for j in range(request.n)
            ],
            usage=UsageInfo.count(sum(len(p.ids) for p in prompts), 0),
            hpr=edit.applied,
        )
        if not request.stream:
            return response
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def frames() -> AsyncIterator[str]:
            for i, choice in enumerate(response.choices):
                chunk = CompletionChunk(
                    id=response.id, created=response.created, model=model, choices=[choice],
                    hpr=edit.applied if i == 0 else None,
                )  # fmt: skip
                yield chunk_json(chunk)
            if include_usage:
                yield chunk_json(
                    CompletionChunk(
                        id=response.id, created=response.created, model=model, choices=[], usage=response.usage
                    )
                )

        return with_error_frame(frames())

    def _choice(self, index: int, request: CompletionRequest, prompt: Prompt, r: ChoiceResult) -> CompletionChoice:
        logprobs = None
        if request.logprobs is not None:
            if request.echo:
                entries = [*(r.prompt_logprobs or []), *r.logprobs]
                logprobs = completion_logprobs(entries, 0, self._first_token(prompt))
            else:
                logprobs = completion_logprobs(r.logprobs, len(prompt.text))
        return CompletionChoice(
            index=index,
            text=(prompt.text if request.echo else "") + r.text,
            logprobs=logprobs,
            finish_reason=r.finish_reason,
            hpr_stats=stats_payload(r.edit_stats),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        response_id: str,
        model: str,
        edit: ResolvedEdit,
        owners: list[Prompt],
        prompt_tokens: int,
        iterators: list[AsyncIterator[GenerationOutput]],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        created = now()
        completion_tokens = [0] * len(iterators)
        offsets = [0 if request.echo else len(p.text) for p in owners]  # text_offset of the next token
        echoed = [not request.echo] * len(iterators)
        first_chunk = True
        async for i, out in merge_streams(iterators):
            completion_tokens[i] = out.completion_tokens
            text = out.text
            entries: list[TokenLogprob | None] = list(out.logprobs or [])
            if not echoed[i]:
                echoed[i] = True
                text = owners[i].text + text
                entries = [*(out.prompt_logprobs or []), *entries]
            logprobs = None
            if request.logprobs is not None and entries:
                logprobs = completion_logprobs(entries, offsets[i], self._first_token(owners[i]))
                offsets[i] += sum(len(t) for t in logprobs.tokens)
            if not (text or logprobs or out.finish_reason):
                continue
            choice = CompletionChoice(
                index=i,
                text=text,
                logprobs=logprobs,
                finish_reason=out.finish_reason,
                hpr_stats=stats_payload(out.edit_stats),
            )
            hpr = edit.applied if first_chunk else None
            first_chunk = False
            yield chunk_json(CompletionChunk(id=response_id, created=created, model=model, choices=[choice], hpr=hpr))
        if include_usage:
            total = sum(completion_tokens)
            usage = UsageInfo.count(prompt_tokens, total)
            yield chunk_json(CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage))
