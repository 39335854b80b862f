"""The HTTP routes: thin — validate, call the serving logic, wrap streams in SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from server.metrics import ServerMetrics
from server.protocol import (
    AdapterDeleted,
    AdapterLoadRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.runtime import Runtime, get_runtime, get_settings
from server.serving.adapters import load_adapter, unload_adapter
from server.serving.chat import ServingChat
from server.serving.completion import ServingCompletion
from server.serving.models import get_model, list_models
from server.settings import ServerSettings

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}

# `stream: true` answers with server-sent events instead of the JSON body.
_STREAMED: dict[int | str, dict[str, object]] = {
    **_ERRORS,
    200: {"content": {"text/event-stream": {"schema": {"type": "object"}}}},  # completed in server/openapi.py
}

router = APIRouter()
admin_router = APIRouter()  # included only with --adapter-root; the admin key guards it (server/auth.py)


def _sse(frames: AsyncIterator[str]) -> EventSourceResponse:
    # ping: a comment line every 15 s keeps proxies from closing a stream whose prefill is slow.
    return EventSourceResponse(frames, ping=15, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(runtime: RuntimeDep) -> dict[str, str]:
    """200 once the model is loaded and the engine runs; 503 (with the reason) before that or while stopping."""
    return {"status": "ok", "model": runtime.base_id}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format (``text/plain; version=…``)."""
    registry = request.app.state.metrics
    assert isinstance(registry, ServerMetrics)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def models(runtime: RuntimeDep) -> ModelList:
    return list_models(runtime)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def model(model_id: str, runtime: RuntimeDep) -> ModelCard:
    return get_model(runtime, model_id)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAMED)
async def chat_completions(body: ChatCompletionRequest, request: Request, runtime: RuntimeDep) -> Response:
    result = await ServingChat(runtime).create(body, request)
    if isinstance(result, ChatCompletionResponse):
        return JSONResponse(result.model_dump(mode="json"))
    return _sse(result)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAMED)
async def completions(body: CompletionRequest, request: Request, runtime: RuntimeDep) -> Response:
    result = await ServingCompletion(runtime).create(body, request)
    if isinstance(result, CompletionResponse):
        return JSONResponse(result.model_dump(mode="json"))
    return _sse(result)


@admin_router.post("/v1/adapters", response_model=ModelCard, responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def adapters_load(
    body: AdapterLoadRequest, runtime: RuntimeDep, settings: Annotated[ServerSettings, Depends(get_settings)]
) -> ModelCard:
    """Load an adapter from inside ``--adapter-root`` and make it routable (admin key)."""
    assert settings.adapter_root is not None  # the router is only mounted with a root
    return await load_adapter(runtime, settings.adapter_root, body)


@admin_router.delete("/v1/adapters/{name}", response_model=AdapterDeleted, responses=_ERRORS)
async def adapters_unload(name: str, runtime: RuntimeDep) -> AdapterDeleted:
    """Stop routing an adapter; it is unloaded once its running requests finish (admin key)."""
    return unload_adapter(runtime, name)
