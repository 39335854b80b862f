"""The FastAPI application: ``create_app(settings)`` wires routes, middlewares, error handlers and the lifespan."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.auth import APIKeyMiddleware, warn_if_exposed
from server.body_limit import BodyLimitMiddleware
from server.errors import install_error_handlers
from server.metrics import RequestMetricsMiddleware, ServerMetrics
from server.openapi import install_openapi
from server.playground import router as playground_router
from server.request_id import RequestIdMiddleware
from server.routes import admin_router, router
from server.runtime import EngineFactory, default_engine_factory, make_lifespan
from server.serving.admission import RefuseWhenFull
from server.settings import ServerSettings


def create_app(settings: ServerSettings | None = None, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. The model loads when the app starts (its lifespan), not here.

    ``engine_factory`` replaces the batching engine (tests use a scripted fake).
    """
    settings = settings or ServerSettings()
    app = FastAPI(
        title="hpr-serve",
        summary="OpenAI-compatible server for LLMs edited by Householder Pseudo-Rotation",
        version="0.1.0",
        lifespan=make_lifespan(engine_factory or default_engine_factory),
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    warn_if_exposed(settings)
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.runtime = None
    app.state.load_error = None
    app.state.stopping = False
    app.include_router(router)
    if settings.playground:
        app.include_router(playground_router)
    if settings.adapter_root is not None:  # adapters at run time: off unless a root is given
        app.include_router(admin_router)
    install_error_handlers(app)
    install_openapi(app)
    # Added innermost first: a request meets request id → metrics → CORS → API key → refusal when full → body limit
    # → routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RefuseWhenFull)
    keys = settings.api_keys()
    if settings.admin_key is not None and settings.admin_key in keys:  # --api-key-file is read only now
        raise ValueError("--admin-key must differ from every API key (--api-key, --api-key-file)")
    admin_keys = frozenset({settings.admin_key}) if settings.admin_key else frozenset()
    app.add_middleware(APIKeyMiddleware, keys=keys, admin_keys=admin_keys)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app
