"""Request body size limit: 413 in the error envelope, whether the size is announced or streamed (chunked)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes``.

    With a ``Content-Length`` header the request is refused before the app runs; a chunked body is counted as it
    arrives and the read that crosses the limit raises ``HTTPException(413)``, which FastAPI passes to the error
    handlers (so the client still gets the envelope).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"request body larger than {self.max_bytes} bytes", code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    announced = -1
                if announced > self.max_bytes:
                    await self._too_large().response()(scope, receive, send)
                    return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counting_receive, send)
