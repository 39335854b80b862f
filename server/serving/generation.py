"""Driving engine generations for the n choices of one request: collect them, or stream them merged.

Every engine iterator opened here is closed on every path (done, error, client gone, task cancelled), and closing
it is what tells the engine to drop the request and free its batch slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from hpr.edit_stats import EditStats
from server.engine.types import FinishReason, GenerationOutput, GenerationRequest, TokenLogprob
from server.errors import APIError
from server.runtime import EngineLike

T = TypeVar("T")


class ClientDisconnected(APIError):
    def __init__(self) -> None:
        super().__init__(499, "client closed the request", code="client_closed_request")


@dataclass
class ChoiceResult:
    """All events of one generation, folded together."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    edit_stats: EditStats | None = None

    def add(self, out: GenerationOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens
        if out.edit_stats is not None:
            self.edit_stats = out.edit_stats


async def close_iterator(iterator: AsyncIterator[GenerationOutput]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client goes away first; then cancel it and raise :class:`ClientDisconnected`."""
    main = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({main, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(BaseException):
                await main
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if main.cancelled():
        raise ClientDisconnected()
    return main.result()


async def _consume(engine: EngineLike, request: GenerationRequest) -> ChoiceResult:
    iterator = engine.generate(request)
    result = ChoiceResult()
    try:
        async for out in iterator:
            result.add(out)
    finally:
        await close_iterator(iterator)
    return result


async def _gather_or_cancel(tasks: Sequence[asyncio.Future[T]]) -> list[T]:
    """Like ``gather``, but the first failure cancels (and awaits) the siblings before it propagates."""
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def collect_all(engine: EngineLike, requests: Sequence[GenerationRequest], raw: Request) -> list[ChoiceResult]:
    """Run every choice to the end (concurrently: they share engine steps)."""
    tasks = [asyncio.ensure_future(_consume(engine, r)) for r in requests]
    return await until_disconnected(raw, _gather_or_cancel(tasks))


async def _prepend(first: GenerationOutput, rest: AsyncIterator[GenerationOutput]) -> AsyncIterator[GenerationOutput]:
    try:
        yield first
        if first.finish_reason is None:
            async for out in rest:
                yield out
    finally:
        await close_iterator(rest)


async def open_streams(
    engine: EngineLike, requests: Sequence[GenerationRequest], raw: Request
) -> list[AsyncIterator[GenerationOutput]]:
    """Start every choice and wait for its first event, so queue-full / invalid-request errors become a proper
    HTTP status before any SSE header is sent. Returns one iterator per choice (first event included)."""
    iterators = [engine.generate(r) for r in requests]
    tasks = [asyncio.ensure_future(anext(it)) for it in iterators]
    try:
        firsts = await until_disconnected(raw, _gather_or_cancel(tasks))
    except StopAsyncIteration:
        for it in iterators:
            await close_iterator(it)
        raise APIError(500, "the engine ended a request without output", code="engine_error") from None
    except BaseException:
        for it in iterators:
            await close_iterator(it)
        raise
    return [_prepend(first, it) for first, it in zip(firsts, iterators, strict=True)]


async def _pump(
    index: int, iterator: AsyncIterator[GenerationOutput], queue: asyncio.Queue[tuple[int, object]]
) -> None:
    try:
        async for out in iterator:
            await queue.put((index, out))
        await queue.put((index, None))
    except Exception as exc:
        await queue.put((index, exc))
    finally:
        await close_iterator(iterator)


async def merge_streams(
    iterators: Sequence[AsyncIterator[GenerationOutput]],
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Interleave the events of several choices as they come: yields ``(choice index, event)``."""
    if len(iterators) == 1:
        try:
            async for out in iterators[0]:
                yield 0, out
        finally:
            await close_iterator(iterators[0])
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(i, it, queue)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                assert isinstance(item, GenerationOutput)
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
