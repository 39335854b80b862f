"""What the server holds while it runs (model, adapters, editor, engine) and the lifespan that builds it.

Loading happens in a background task started by the FastAPI ``lifespan``, so the port is open at once and
``/health`` answers 503 ("loading") until the engine runs, then 200. A load failure is logged, reported by
``/health`` and handed to ``app.state.on_load_failure`` (the CLI uses it to exit with status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from fastapi import FastAPI, Request

from hpr.checkpoint import HPRAdapter
from hpr.editing import HPREditor
from hpr.model import LoadedModel, load_model
from server.engine.types import EngineObserver, GenerationOutput, GenerationRequest
from server.errors import APIError
from server.metrics import ServerMetrics
from server.serving.admission import Admission
from server.settings import ServerSettings

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """The part of ``server.engine.engine.Engine`` the HTTP layer uses (tests substitute a fake)."""

    observer: EngineObserver | None

    def start(self) -> None: ...
    async def stop(self, drain_timeout: float = 30.0) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def running(self) -> int: ...


EngineFactory = Callable[[LoadedModel, HPREditor, ServerSettings], EngineLike]


def default_engine_factory(loaded: LoadedModel, editor: HPREditor, settings: ServerSettings) -> EngineLike:
    from server.engine.engine import Engine

    engine: EngineLike = Engine(
        loaded,
        editor,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_model_len=settings.max_model_len,
    )
    return engine


@dataclass
class Runtime:
    """Everything a request handler needs, built once at startup."""

    loaded: LoadedModel
    editor: HPREditor
    engine: EngineLike
    adapter_sources: dict[str, Path]
    max_model_len: int
    admission: Admission  # generations held by requests in flight: checked before any tokenizing
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def base_id(self) -> str:
        return self.loaded.model_id

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def adapters(self) -> dict[str, HPRAdapter]:
        return self.editor.adapters

    @property
    def vocab_size(self) -> int:
        config = getattr(self.loaded.model, "config", None)
        size = getattr(config, "vocab_size", None)
        return int(size) if isinstance(size, int) else len(self.tokenizer)


def build_runtime(settings: ServerSettings, engine_factory: EngineFactory) -> Runtime:
    """Load the base model and every ``--adapter`` (blocking; run it in a thread). Raises on any problem."""
    started = time.monotonic()
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    loaded = load_model(settings.model, settings.device, settings.dtype, model_id=settings.served_model_name)
    sources = settings.adapter_paths()
    if loaded.model_id in sources:
        raise ValueError(f"--adapter {loaded.model_id}=...: an adapter cannot take the base model's id")
    adapters = {
        name: HPRAdapter.load(path, name, loaded.hidden_size, loaded.num_layers) for name, path in sources.items()
    }
    editor = HPREditor(loaded.model, adapters)
    engine = engine_factory(loaded, editor, settings)
    max_len = min(settings.max_model_len or loaded.max_context, loaded.max_context)
    if settings.max_model_len is not None and settings.max_model_len > loaded.max_context:
        log.warning("--max-model-len %d exceeds the model's context %d: using %d", settings.max_model_len,
                    loaded.max_context, max_len)  # fmt: skip
    log.info(
        "loaded %s (%d layers, hidden %d, %s on %s) and %d adapter(s) %s in %.1f s",
        loaded.model_id, loaded.num_layers, loaded.hidden_size, loaded.dtype, loaded.device, len(adapters),
        sorted(adapters), time.monotonic() - started,
    )  # fmt: skip
    admission = Admission(settings.max_batch_size, settings.max_queue)
    return Runtime(
        loaded=loaded,
        editor=editor,
        engine=engine,
        adapter_sources=sources,
        max_model_len=max_len,
        admission=admission,
    )


async def _load(app: FastAPI, engine_factory: EngineFactory) -> None:
    state = app.state
    try:
        runtime = await asyncio.to_thread(build_runtime, state.settings, engine_factory)
        metrics: ServerMetrics = state.metrics
        runtime.engine.observer = metrics
        metrics.bind_engine(lambda: runtime.engine.queue_depth, lambda: runtime.engine.running)
        runtime.engine.start()  # on the event loop thread: the engine may bind to the running loop
        state.runtime = runtime
        log.info("ready: serving %s", runtime.base_id)
    except Exception as exc:
        log.critical("startup failed: %s", exc, exc_info=exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        callback: Callable[[str], None] | None = getattr(state, "on_load_failure", None)
        if callback is not None:
            callback(state.load_error)


def make_lifespan(engine_factory: EngineFactory) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = None
        app.state.load_error = None
        app.state.stopping = False
        loader = asyncio.create_task(_load(app, engine_factory))
        try:
            yield
        finally:
            app.state.stopping = True
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            runtime: Runtime | None = app.state.runtime
            if runtime is not None:
                await runtime.engine.stop(drain_timeout=app.state.settings.drain_timeout)
                runtime.editor.detach()
                log.info("engine stopped")

    return lifespan


# --- dependencies ------------------------------------------------------------------------------------------------


def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


def get_runtime(request: Request) -> Runtime:
    """The loaded runtime, or a 503 while loading, after a failed load, or while shutting down."""
    state = request.app.state
    runtime: Runtime | None = getattr(state, "runtime", None)
    if getattr(state, "stopping", False):
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if runtime is None:
        error = getattr(state, "load_error", None)
        if error:  # the details (paths, exception text) are in the server log, not for every client
            raise APIError(503, "the model failed to load", code="load_failed")
        raise APIError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})
    return runtime
