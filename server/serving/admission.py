"""Admission: refuse a request the server cannot hold before any work is spent on it (templating, tokenizing).

The server holds at most ``max_batch_size + max_queue`` generations (running or waiting). Each request takes a
:class:`Ticket` for its generations (``n``, or prompts × ``n``) first thing, and gives it back when its response or
stream ends. A request that could never fit is a 400 on ``n``; one that does not fit now is a 429 (the engine
keeps its own check as the last word).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.engine.types import QueueFullError
from server.errors import APIError


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
            raise QueueFullError(
                f"the server is full ({self.held} generations running or queued, at most {self.capacity}); retry later",
                retry_after=1.0,
            )
        self.held += choices
        return Ticket(self, choices)
