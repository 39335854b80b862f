"""API-key authentication: ``Authorization: Bearer <key>`` on every ``/v1/*`` route and on the API docs
(``/docs``, ``/redoc``, ``/openapi.json``) when keys are configured.

A pure ASGI middleware, so a request without a valid key is refused (401) before its body is read or parsed.
``/health`` and ``/metrics`` stay open (probes and scrapers carry no key), as in vLLM. The adapter endpoints
(``/v1/adapters``) take the admin key instead, and only it: a user key does not open them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError
from server.settings import ServerSettings

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1"
ADMIN_PREFIX = "/v1/adapters"
PROTECTED_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def is_admin(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public interface


def warn_if_exposed(settings: ServerSettings) -> None:
    """Log a warning when the server will listen beyond loopback with no API key."""
    if not is_loopback(settings.host) and not settings.api_keys():
        log.warning(
            "binding %s without an API key: anyone who can reach this address can use the model; "
            "set --api-key / --api-key-file (or HPR_API_KEY)",
            settings.host,
        )


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
    """Refuse ``/v1/*`` and docs requests whose bearer token is not one of ``keys`` (no check when ``keys`` is
    empty); with ``admin_keys``, ``/v1/adapters`` requests are checked against those instead."""

    def __init__(self, app: ASGIApp, keys: frozenset[str], admin_keys: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.keys = keys
        self.admin_keys = admin_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        admin = bool(self.admin_keys) and is_admin(path)  # no admin key: the endpoints are off (404)
        accepted = self.admin_keys if admin else self.keys
        if (
            accepted
            and scope["type"] == "http"
            and scope.get("method") != "OPTIONS"  # CORS preflights carry no credentials
            and is_protected(path)
        ):
            token = bearer_token(scope)
            if token is None or not key_matches(token, accepted):
                message = "missing API key: send 'Authorization: Bearer <key>'" if token is None else "invalid API key"
                error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
