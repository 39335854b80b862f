"""API-key authentication: ``Authorization: Bearer <key>`` on every ``/v1/*`` route when keys are configured.

A pure ASGI middleware, so a request without a valid key is refused (401) before its body is read or parsed.
``/health`` and ``/metrics`` stay open (probes and scrapers carry no key), as in vLLM.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError

PROTECTED_PREFIX = "/v1"


def key_matches(presented: str, accepted: frozenset[str]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on the first match)."""
    given = presented.encode()
    found = False
    for key in accepted:
        found |= hmac.compare_digest(given, key.encode())
    return found


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class APIKeyMiddleware:
    """Refuse ``/v1/*`` requests whose bearer token is not one of ``keys`` (no-op when ``keys`` is empty)."""

    def __init__(self, app: ASGIApp, keys: frozenset[str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.keys
            and scope["type"] == "http"
            and scope.get("method") != "OPTIONS"  # CORS preflights carry no credentials
            and str(scope.get("path", "")).startswith(PROTECTED_PREFIX)
        ):
            token = bearer_token(scope)
            if token is None or not key_matches(token, self.keys):
                message = "missing API key: send 'Authorization: Bearer <key>'" if token is None else "invalid API key"
                error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
