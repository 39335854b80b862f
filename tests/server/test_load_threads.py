"""Loading the model and adapters runs on a thread that ends with the load (``server.runtime.in_own_thread``).

Why it matters: a thread that has run a parallel torch op keeps an OpenMP team while it lives, and with more OpenMP
threads than cores libgomp sleeps between parallel regions, which made every engine step ~1.7x slower at 2 threads
(docs/benchmarks.md). ``asyncio.to_thread`` keeps its worker alive; these tests fail with it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hpr.registry import AdapterRegistry
from server.runtime import Runtime, in_own_thread
from server.settings import ServerSettings
from tests.conftest import make_random_adapter
from tests.server.fake_engine import FakeEngine
from tests.server.live_server import run_server
from tests.server.test_adapters_api import ADMIN_HEADERS, admin_settings


async def cancel_while_running(work: Callable[[], object]) -> None:
    """Start ``work`` through ``in_own_thread`` and cancel the caller while it runs."""
    task = asyncio.ensure_future(in_own_thread(work))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_in_own_thread_returns_and_raises_from_a_thread_that_has_ended() -> None:
    seen: list[threading.Thread] = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        if x < 0:
            raise ValueError("negative")
        return 2 * x

    async def main() -> tuple[int, str]:
        value = await in_own_thread(work, 21)
        with pytest.raises(ValueError, match="negative") as raised:
            await in_own_thread(work, -1)
        return value, str(raised.value)

    assert asyncio.run(main()) == (42, "negative")
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(t is not threading.main_thread() and not t.is_alive() for t in seen)


def test_in_own_thread_cancelled_returns_at_once_and_the_work_finishes() -> None:
    release, finished = threading.Event(), threading.Event()

    def work() -> None:
        release.wait(10)
        finished.set()

    async def main() -> None:
        await cancel_while_running(work)
        assert not finished.is_set()  # the caller did not wait for the work
        release.set()
        assert await asyncio.to_thread(finished.wait, 10)

    asyncio.run(main())


def test_startup_and_adapter_loads_run_on_threads_that_have_ended(
    tiny_settings: ServerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, list[threading.Thread]] = {"factory": [], "load_adapter": []}

    def factory(settings: ServerSettings, registry: AdapterRegistry) -> FakeEngine:
        threads["factory"].append(threading.current_thread())
        return FakeEngine(settings, registry)

    original = Runtime.load_adapter

    def load_adapter(self: Runtime, name: str, path: Any, defaults: Any = None) -> Any:
        threads["load_adapter"].append(threading.current_thread())
        return original(self, name, path, defaults)

    monkeypatch.setattr(Runtime, "load_adapter", load_adapter)
    make_random_adapter(seed=3).save(tmp_path / "extra")
    with run_server(admin_settings(tiny_settings, tmp_path), factory) as live:
        response = httpx.post(
            live.api_base + "/adapters", json={"name": "extra", "path": "extra"}, headers=ADMIN_HEADERS, timeout=30
        )
        assert response.status_code == 200, response.text
        # the startup's adapter (--adapter tiny) and the one loaded at run time
        assert len(threads["factory"]) == 1 and len(threads["load_adapter"]) == 2
        loaders = threads["factory"] + threads["load_adapter"]
        assert not any(t.is_alive() for t in loaders), [t.name for t in loaders if t.is_alive()]
        assert all(t.name.startswith("hpr-load-") for t in loaders)


def _thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_in_own_thread_work_that_ends_after_its_loop_closed_raises_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller was cancelled and the loop closed (e.g. a server stopped during a load): the thread's hand-off
    finds no loop, and that is not an error."""
    errors = _thread_errors(monkeypatch)
    release = threading.Event()
    threads: list[threading.Thread] = []

    def work() -> int:
        threads.append(threading.current_thread())
        release.wait(10)
        return 1

    async def main() -> None:
        await cancel_while_running(work)

    asyncio.run(main())  # closes the loop
    release.set()
    threads[0].join(10)
    assert not threads[0].is_alive()
    assert errors == []


@pytest.mark.parametrize("fails", [False, True])
def test_in_own_thread_outcome_after_a_cancelled_caller_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """The loop still runs when the cancelled caller's work ends: its result or error goes nowhere, without an error
    in the thread or an "exception was never retrieved" from the loop."""
    errors = _thread_errors(monkeypatch)
    loop_errors: list[dict[str, Any]] = []
    release, finished = threading.Event(), threading.Event()

    def work() -> int:
        release.wait(10)
        finished.set()
        if fails:
            raise ValueError("late failure")
        return 1

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
        await cancel_while_running(work)
        release.set()
        assert await asyncio.to_thread(finished.wait, 10)
        await asyncio.sleep(0.1)  # the hand-off callback runs on the loop
        gc.collect()  # an unretrieved exception is reported when its future is collected

    asyncio.run(main())
    assert errors == []
    assert loop_errors == []
