"""Admission: refuse a request the server cannot hold before any work is spent on it (templating, tokenizing).

The server holds at most ``max_batch_size + max_queue`` generations (running or waiting). Each request takes a
:class:`Ticket` for its generations (``n``, or prompts × ``n``) first thing, and gives it back when its response or
stream ends. A request that could never fit is a 400 on ``n``; one that does not fit now is a 429 (the engine
keeps its own check as the last word).

When the server is already full, :class:`RefuseWhenFull` answers a generation request with the same 429 before its
body is even read: under a burst, the refusals then cost a few header checks each instead of waiting behind the
parsing, validation and templating of the requests that were admitted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine.types import QueueFullError
from server.errors import APIError, to_api_error

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class Ticket:
    """Generations held by one request; :meth:`release` is idempotent."""

    def __init__(self, admission: Admission, choices: int) -> None:
        self._admission = admission
        self.choices = choices

    def release(self) -> None:
        if self.choices:
            self._admission.held -= self.choices
            self.choices = 0

    async def hold_until_done(self, frames: AsyncIterator[str]) -> AsyncIterator[str]:
        """Pass a stream through, releasing the ticket when it ends (finished, failed or cancelled)."""
        try:
            async for frame in frames:
                yield frame
        finally:
            self.release()


class Admission:
    """Counts the generations held by requests in flight (event-loop only: no lock needed)."""

    def __init__(self, max_batch_size: int, max_queue: int) -> None:
        self.capacity = max_batch_size + max_queue
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.held = 0

    def admit(self, choices: int, param: str = "n") -> Ticket:
        if choices > self.capacity:
            raise APIError(
                400,
                f"this request asks for {choices} generations, more than the server can ever hold at once "
                f"({self.capacity} = max_batch_size {self.max_batch_size} + max_queue {self.max_queue}); "
                "send fewer choices per request",
                param=param,
                code="invalid_value",
            )
        if self.held + choices > self.capacity:
            raise self.full_error()
        self.held += choices
        return Ticket(self, choices)

    @property
    def full(self) -> bool:
        """No request, however small, fits now."""
        return self.held >= self.capacity

    def full_error(self) -> QueueFullError:
        return QueueFullError(
            f"the server is full ({self.held} generations running or queued, at most {self.capacity}); retry later",
            retry_after=1.0,
        )


class RefuseWhenFull:
    """ASGI middleware: a generation request that arrives while the server is full gets its 429 at once, before the
    body is read, parsed and validated (an invalid body that arrives then is told to retry, not what is wrong)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in GENERATION_PATHS:
            app = scope.get("app")
            runtime = getattr(getattr(app, "state", None), "runtime", None)
            if runtime is not None and runtime.admission.full:
                await to_api_error(runtime.admission.full_error()).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
