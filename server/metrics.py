"""Prometheus metrics (``GET /metrics``), fed by the engine's observer hooks and an HTTP middleware.

Each app owns its own :class:`CollectorRegistry`, so several servers in one process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds. TTFT spans a queue wait + prefill; inter-token latency is one decode step (ms on a GPU, tens on a CPU).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/health", "/metrics"})
_PREFIXES = (("/v1/models/", "/v1/models/{id}"), ("/v1/adapters/", "/v1/adapters/{name}"))


class ServerMetrics:
    """All metrics of one server. Implements the engine's ``EngineObserver`` protocol (thread-safe)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the output and nobody graphs them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "hpr_http_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.prompt_tokens = Counter("hpr_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("hpr_generation_tokens", "Generated tokens of finished requests.", registry=r)
        self.queue_depth = Gauge("hpr_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("hpr_running_requests", "Sequences in the running batch.", registry=r)
        self.step_batch_size = Histogram(
            "hpr_step_batch_size", "Sequences per engine forward step.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "hpr_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "hpr_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.edited_tokens = Counter(
            "hpr_edited_tokens", "Token positions passed through an HPR edit, by decoder layer.", ["layer"], registry=r
        )

    def bind_engine(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the gauges live from the engine at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    # --- EngineObserver ------------------------------------------------------------------------------------------

    def on_step(self, batch_size: int) -> None:
        self.step_batch_size.observe(batch_size)

    def on_first_token(self, request_id: str, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_token(self, request_id: str, seconds_since_last: float) -> None:
        self.itl.observe(seconds_since_last)

    def on_finish(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def on_edit(self, layer: int, tokens: int) -> None:
        self.edited_tokens.labels(layer=str(layer)).inc(tokens)


class RequestMetricsMiddleware:
    """Counts every HTTP request by route (known routes only: bounded label cardinality), method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope.get("path", "")
            route = path if path in _ROUTES else next((r for p, r in _PREFIXES if path.startswith(p)), "other")
            self.metrics.requests.labels(route=route, method=scope.get("method", ""), status=str(status)).inc()
