"""Run ``hpr-serve``'s app with uvicorn in a background thread on a free loopback port (real HTTP)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.runtime import EngineFactory
from server.settings import ServerSettings


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:<port>
    app: FastAPI
    server: uvicorn.Server

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.app.state.runtime.engine


@contextmanager
def run_server(
    settings: ServerSettings, engine_factory: EngineFactory | None = None, wait_ready: bool = True, timeout: float = 120
) -> Iterator[LiveServer]:
    """Start the app; with ``wait_ready``, return once ``/health`` says 200. Stops (graceful) on exit."""
    app = create_app(settings, engine_factory=engine_factory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(base_url=f"http://127.0.0.1:{port}", app=app, server=server)
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        while wait_ready:
            if httpx.get(live.base_url + "/health").status_code == 200:
                break
            if app.state.load_error or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready: {app.state.load_error}")
            time.sleep(0.02)
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
