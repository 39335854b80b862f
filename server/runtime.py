"""What the server holds while it runs (adapter registry, engine, admission) and the lifespan that builds it.

Loading happens in a background task started by the FastAPI ``lifespan``, so the port is open at once and
``/health`` answers 503 ("loading") until the engine runs, then 200. A load failure is logged, reported by
``/health`` and handed to ``app.state.on_load_failure`` (the CLI uses it to exit with status 1).

The backend seam: an :data:`EngineFactory` gets the settings and the :class:`~hpr.registry.AdapterRegistry`, loads
its own model, binds the registry to the model's shape, and returns an :class:`EngineLike` that publishes a
:class:`~server.engine.types.ModelInfo`. The HTTP layer knows the model only through that ``info`` and the
adapters only through the registry (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from fastapi import FastAPI, Request

from hpr.checkpoint import HPRAdapter
from hpr.edit_spec import AdapterDefaults
from hpr.errors import AdapterConflictError, HPRError
from hpr.model import load_model, read_model_config
from hpr.registry import AdapterRegistry
from server.engine.types import EngineObserver, GenerationOutput, GenerationRequest, ModelInfo
from server.errors import APIError
from server.metrics import ServerMetrics
from server.serving.admission import Admission
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.serving.structured import GrammarCompiler

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLike(Protocol):
    """What the HTTP layer needs from a backend (``server.engine.engine.Engine``; tests substitute a fake)."""

    observer: EngineObserver | None
    info: ModelInfo

    def start(self) -> None: ...
    async def stop(self, drain_timeout: float = 30.0) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def running(self) -> int: ...


# A backend: load the model named by the settings, bind the registry to it (AdapterRegistry.bind), return the engine.
EngineFactory = Callable[[ServerSettings, AdapterRegistry], EngineLike]


def default_engine_factory(settings: ServerSettings, registry: AdapterRegistry) -> EngineLike:
    """The backend ``settings.backend`` names: :func:`hf_engine_factory` or the vllm backend."""
    if settings.backend == "vllm":
        from server.vllm_backend.engine import vllm_engine_factory

        return vllm_engine_factory(settings, registry)
    return hf_engine_factory(settings, registry)


def hf_engine_factory(settings: ServerSettings, registry: AdapterRegistry) -> EngineLike:
    """The in-process Hugging Face backend: transformers model, forward hooks, continuous batching."""
    from server.allocator import keep_freed_memory
    from server.engine.engine import Engine
    from server.engine.support import check_options

    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    if settings.malloc_tuning:
        keep_freed_memory()  # process-wide, like the thread count: before the model's memory is allocated
    # options the model cannot use stop here, after its config is read and before its weights load
    check_options(read_model_config(settings.model), settings.compile_decode, settings.quantization)
    loaded = load_model(
        settings.model,
        settings.device,
        settings.dtype,
        model_id=settings.served_model_name,
        quantization=settings.quantization,
    )
    engine: EngineLike = Engine(
        loaded,
        registry,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_model_len=settings.max_model_len,
        prefill_chunk=settings.prefill_chunk or None,
        mixed_prefill=settings.mixed_prefill,
        max_step_tokens=settings.max_step_tokens or None,
        compile_decode=settings.compile_decode,
        compile_max_graphs=settings.compile_max_graphs,
        compile_autotune=settings.compile_autotune,
    )
    return engine


@dataclass
class Runtime:
    """Everything a request handler needs, built once at startup."""

    engine: EngineLike
    registry: AdapterRegistry
    admission: Admission  # generations held by requests in flight: checked before any tokenizing
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Compiles response formats and tool schemas for this model's tokenizer (made on first use)."""
        from server.serving.structured import GrammarCompiler

        return GrammarCompiler(self.info)

    @property
    def base_id(self) -> str:
        return self.info.model_id

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def load_adapter(
        self, name: str, path: str | os.PathLike[str], defaults: AdapterDefaults | None = None
    ) -> HPRAdapter:
        """Load, validate and route the adapter at ``path`` as ``name``, with ``defaults`` replacing its own default
        alpha, scope and edited tokens under that name (blocking: at startup, or in a thread).

        Raises :class:`~hpr.errors.CheckpointError` (bad checkpoint) or :class:`AdapterConflictError` (name taken,
        by an adapter or by the base model); the registry is unchanged then.
        """
        if name == self.base_id:
            raise AdapterConflictError(f"an adapter cannot take the base model's id {name!r}")
        started = time.perf_counter()
        adapter = self.registry.load(name, path, defaults)
        log.info(
            "adapter %s loaded (%s, %d layers) in %.2f s; adapters: %s",
            name, adapter.config.method, len(adapter.config.layers), time.perf_counter() - started,
            self.registry.names(),
        )  # fmt: skip
        return adapter

    def unload_adapter(self, name: str) -> int:
        """Stop routing ``name``; it is dropped once its running requests finish. Returns how many still run."""
        if self.registry.unload(name):
            log.info("adapter %s unloaded; adapters: %s", name, self.registry.names())
            return 0
        running = self.registry.running(name)
        log.info("adapter %s unloading after its %d running request(s); adapters: %s", name, running,
                 self.registry.names())  # fmt: skip
        return running


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that ends when it returns (``asyncio.to_thread`` would keep the thread).

    For blocking work that runs torch ops outside the engine thread (loading the model and adapters). Every thread
    that runs a parallel torch op gets its own OpenMP (libgomp) team, kept as long as the thread lives. When a
    process holds more OpenMP threads than the machine has cores, libgomp stops spinning between parallel regions
    and puts its threads to sleep, and each of the step's hundreds of regions pays a wake-up: a loader thread left
    alive made every later decode step of the engine ~1.7x slower on the 2-core development machine at 2 threads
    (docs/benchmarks.md). A thread that ends releases its team."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def hand_off(outcome: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(lambda: None if done.done() else outcome())
        except RuntimeError:  # the loop closed while the work ran: nobody is waiting for it
            log.debug("%s finished after its event loop closed", thread.name)

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            hand_off(functools.partial(done.set_exception, exc))
        else:
            hand_off(functools.partial(done.set_result, result))

    thread = threading.Thread(target=work, name=f"hpr-load-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    try:
        await asyncio.wait({done})
    except asyncio.CancelledError:  # the caller returns at once; the thread finishes its work and ends, its outcome
        done.cancel()  # dropped (a cancelled future takes no result, and logs no unretrieved exception)
        raise
    await asyncio.to_thread(thread.join)  # ended: its OpenMP team is released before the engine starts
    return done.result()


def build_runtime(settings: ServerSettings, engine_factory: EngineFactory) -> Runtime:
    """Load the base model (through the factory) and every ``--adapter``; blocking: run it with :func:`in_own_thread`
    (it runs torch ops)."""
    started = time.monotonic()
    registry = AdapterRegistry()
    engine = engine_factory(settings, registry)
    if registry.hidden_size is None:
        raise HPRError("the engine factory did not bind the adapter registry to its model (AdapterRegistry.bind)")
    runtime = Runtime(
        engine=engine, registry=registry, admission=Admission(settings.max_batch_size, settings.max_queue)
    )
    try:
        for name, (path, defaults) in settings.adapters().items():
            runtime.load_adapter(name, path, defaults)
    except BaseException:
        with contextlib.suppress(Exception):
            asyncio.run(engine.stop(drain_timeout=0))  # never started: releases its hooks
        raise
    info = engine.info
    log.info(
        "loaded %s (%d layers, hidden %d, context %d; %s on %s, backend %s) and %d adapter(s) %s in %.1f s",
        info.model_id, info.num_layers, info.hidden_size, info.max_model_len, info.dtype, info.device,
        settings.backend, len(registry.names()), registry.names(), time.monotonic() - started,
    )  # fmt: skip
    return runtime


async def _load(app: FastAPI, engine_factory: EngineFactory) -> None:
    state = app.state
    try:
        runtime = await in_own_thread(build_runtime, state.settings, engine_factory)
        metrics: ServerMetrics = state.metrics
        runtime.engine.start()  # on the event loop thread: the engine may bind to the running loop
        if state.settings.compile_decode and state.settings.compile_warmup:
            from server.warmup import warm_up

            try:
                await warm_up(runtime.engine, runtime.registry)  # before the metrics see requests, and /health ok
            except BaseException:  # a failed warm-up, or a shutdown during it: the engine must not run on
                with contextlib.suppress(Exception):
                    await asyncio.shield(runtime.engine.stop(drain_timeout=0))
                raise
        runtime.engine.observer = metrics
        metrics.bind_engine(lambda: runtime.engine.queue_depth, lambda: runtime.engine.running)
        state.runtime = runtime
        log.info("ready: serving %s", runtime.base_id)
        state.grammar_setup = asyncio.create_task(_prepare_grammars(runtime))  # kept: a task needs a reference
    except Exception as exc:
        # an error raised on purpose says what is wrong: the traceback only for the unexpected
        log.critical("startup failed: %s", exc, exc_info=None if isinstance(exc, HPRError) else exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        callback: Callable[[str], None] | None = getattr(state, "on_load_failure", None)
        if callback is not None:
            callback(state.load_error)


async def _prepare_grammars(runtime: Runtime) -> None:
    """llguidance's view of the tokenizer (0.6-1.3 s for a 49k vocabulary) and the mask libraries' imports (about
    1.5 s), made once the server is ready, so the first structured request does not wait for them; a model whose
    tokenizer llguidance cannot read is said once, here."""
    from server.engine.grammar import preload
    from server.serving.structured import UnsupportedTokenizerError

    try:
        await asyncio.to_thread(preload)
        await asyncio.to_thread(runtime.grammars.tokenizer)
    except UnsupportedTokenizerError as exc:
        log.warning("%s: response_format and tools get a 400; free text is served as usual", exc)
    except Exception:  # never fatal: the first structured request meets the error itself
        log.exception("preparing structured output failed")


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
                log.info("engine stopped")

    return lifespan


# --- dependencies ------------------------------------------------------------------------------------------------


async def get_settings(request: Request) -> ServerSettings:  # async: no thread-pool hop per request
    settings: ServerSettings = request.app.state.settings
    return settings


async def get_runtime(request: Request) -> Runtime:
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
