"""The one place where errors become HTTP: the OpenAI error envelope and every exception → status mapping.

Every non-2xx answer of the server has the body ``{"error": {"message", "type", "param", "code"}}`` — routing 404s,
405s, validation errors, malformed JSON, 413, 401, 429 (with ``Retry-After``), 503 and unexpected 500s alike.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpr.errors import AdapterConflictError, CheckpointError, EditSpecError, HPRError, UnknownAdapterError
from server.engine.types import EngineError, EngineStoppedError, InvalidRequestError, PromptTooLongError, QueueFullError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send to the client as the OpenAI envelope with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception (core, engine, ours) to the error the client sees. Unknown ones become a logged 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param=exc.param or "hpr.adapter", code="adapter_not_found")
    if isinstance(exc, EditSpecError):
        return APIError(400, str(exc), param=exc.param, code="invalid_edit")
    if isinstance(exc, CheckpointError):  # only an adapter loaded at run time gets here: its path was given
        return APIError(400, str(exc), param="path", code="invalid_checkpoint")
    if isinstance(exc, AdapterConflictError):
        return APIError(409, str(exc), param="name", code="adapter_exists")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, QueueFullError):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": retry})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc) or "the server is shutting down", code="shutting_down")
    if isinstance(exc, EngineError):
        log.error("engine error: %s", exc, exc_info=exc)
        return APIError(500, f"engine error: {exc}", code="engine_error")
    log.error("unhandled error: %r", exc, exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|\w+\[.*\]|function-.*|constrained-.*)$", re.IGNORECASE)


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """``("body", "hpr", "layers", 0)`` → ``"hpr.layers[0]"``.

    The leading ``body`` is dropped, and so are the union-branch names pydantic inserts (``"str"``,
    ``"list[int]"``), which are no field of the request.
    """
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _UNION_BRANCH.match(str(part)):
            text += f".{part}" if text else str(part)
    return text or None


def validation_error(exc: RequestValidationError) -> APIError:
    """Re-shape FastAPI's 422 into a 400 envelope naming the first bad field (as OpenAI and vLLM do)."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if loc == ("body",):
        if first.get("type") == "missing":
            # fastapi 0.136 also reports a `null` body as missing
            return APIError(400, "the request needs a body: a JSON object", code="invalid_json")
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = _param_from_loc(loc)
    # A union field (e.g. `stop`, `hpr.layers`) reports one error per alternative: say them together.
    same_field = [e for e in errors if _param_from_loc(tuple(e.get("loc", ()))) == param]
    detail = " or ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same_field))
    message = f"{param}: {detail}" if param else detail
    others = len({_param_from_loc(tuple(e.get("loc", ()))) for e in errors} - {param})
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return APIError(400, message, param=param, code=str(first.get("type")) if first.get("type") else None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise through :func:`to_api_error` and the envelope."""

    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def on_http_exception(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {_request.method} {_request.url.path}"
        elif exc.status_code == 405:
            message = f"method {_request.method} is not allowed on {_request.url.path}"
        error = APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=exc.headers)
        return error.response()

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for kind in (APIError, HPRError, EngineError, Exception):
        app.add_exception_handler(kind, on_api_error)
