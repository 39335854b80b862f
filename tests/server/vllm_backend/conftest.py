"""vLLM backend fixtures: one vLLM engine per model family and module, driven from one event loop in a thread.

vLLM is required under ``CI=true`` (``make test`` installs it) and skipped elsewhere when missing.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hpr.registry import AdapterRegistry
from server.engine.types import GenerationOutput, GenerationRequest
from tests.conftest import make_random_adapter, make_steering_adapter
from tests.server.vllm_backend.families import HIDDEN, LAYERS

T = TypeVar("T")

# Small enough for tests: a 64 MB KV cache, prompts above 64 tokens prefilled in chunks over several steps.
TEST_VLLM_ARGS = ["kv_cache_memory_bytes=67108864", "max_num_batched_tokens=64", "max_num_seqs=16"]


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("CI needs vLLM for the vllm backend tests (make setup-dev installs it)", pytrace=False)
        pytest.skip("vLLM is not installed")


class LoopThread:
    """One event loop in a daemon thread: vLLM's async engine stays bound to the loop it first ran on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def tiny_adapters(registry: AdapterRegistry) -> None:
    """``hpr`` (seed 0) and ``other`` (seed 1), random HPR adapters on every layer; ``steer``, a steering vector."""
    registry.add("hpr", make_random_adapter(hidden=HIDDEN, layers=LAYERS, seed=0))
    registry.add("other", make_random_adapter(hidden=HIDDEN, layers=LAYERS, seed=1))
    registry.add("steer", make_steering_adapter(hidden=HIDDEN, layers=LAYERS, seed=2))


@dataclass
class Backend:
    """A started engine of one backend, with its registry and (for vllm) the loop it runs on."""

    engine: Any
    registry: AdapterRegistry
    loop: LoopThread

    def generate(self, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
        """Run ``requests`` concurrently; each one's outputs."""

        async def one(request: GenerationRequest) -> list[GenerationOutput]:
            return [out async for out in self.engine.generate(request)]

        async def all_of() -> list[list[GenerationOutput]]:
            return list(await asyncio.gather(*(one(r) for r in requests)))

        return self.loop.run(all_of())

    def alone(self, requests: list[GenerationRequest]) -> list[list[GenerationOutput]]:
        """Run ``requests`` one after another."""
        return [self.generate([r])[0] for r in requests]


@contextmanager
def started_backend(model_dir: Path, backend: str, vllm_args: list[str] | None = None) -> Iterator[Backend]:
    """A started engine of ``backend`` over ``model_dir`` with the adapters of :func:`tiny_adapters` (fp32, CPU)."""
    from server.runtime import default_engine_factory
    from server.settings import ServerSettings

    settings = ServerSettings(
        model=str(model_dir),
        backend=backend,  # type: ignore[arg-type]
        vllm_arg=list(TEST_VLLM_ARGS if vllm_args is None else vllm_args) if backend == "vllm" else [],
        device="cpu",
        dtype="float32",
        max_batch_size=16,
    )
    registry = AdapterRegistry()
    loop = LoopThread()
    engine = default_engine_factory(settings, registry)
    try:
        tiny_adapters(registry)

        async def start() -> None:
            engine.start()  # on the loop: the engine may bind to it

        loop.run(start())
        yield Backend(engine=engine, registry=registry, loop=loop)
    finally:
        loop.run(engine.stop(drain_timeout=5))
        loop.close()


@pytest.fixture(scope="session")
def hf_backends() -> Iterator[dict[Path, Backend]]:
    """hf engines (the exactness reference), one per model directory, started on first use."""
    from contextlib import ExitStack

    with ExitStack() as stack:

        class _Started(dict[Path, Backend]):
            def __missing__(self, model_dir: Path) -> Backend:
                self[model_dir] = stack.enter_context(started_backend(model_dir, "hf"))
                return self[model_dir]

        yield _Started()
