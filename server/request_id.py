"""``X-Request-Id``: taken from the client (or generated), echoed on every response, and logged once per request.

The outermost middleware, so every answer carries the header — errors from the API-key check, the body limit and
validation, and server-sent event streams included — and the per-request log line (this module's logger, which
replaces uvicorn's access log) names it. The id is also in ``scope["state"]["request_id"]`` for handlers.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("server.access")

HEADER = b"x-request-id"
# What we accept from a client: short, visible ASCII (no spaces: it goes into log lines and headers as is).
_VALID = re.compile(rb"[!-~]{1,128}")


def request_id_from(scope: Scope) -> str:
    """The client's ``X-Request-Id`` if it is a sane token, else a new random one."""
    for name, value in scope.get("headers", []):
        if name == HEADER and _VALID.fullmatch(value):
            return str(value.decode("ascii"))
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # if the app fails before answering, uvicorn sends a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client")
            log.info(
                '%s "%s %s" %d %.1f ms request_id=%s',
                f"{client[0]}:{client[1]}" if client else "-", scope.get("method", ""), scope.get("path", ""), status,
                (time.perf_counter() - started) * 1000, request_id,
            )  # fmt: skip
