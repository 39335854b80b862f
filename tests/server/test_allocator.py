"""server.allocator: glibc keeps freed memory for reuse, unless the user chose otherwise or this is not glibc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from server import allocator
from server.cli import parse_settings


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

        def mallopt(option: int, value: int) -> int:  # a plain function: ctypes' argtypes/restype can be set on it
            self.calls.append((option, value))
            return self.result

        self.mallopt = mallopt


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    libc = FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: libc)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return libc


def test_both_thresholds_are_raised_mmap_first_then_one_arena(fake_libc: FakeLibc) -> None:
    assert allocator.keep_freed_memory() == "set"
    assert fake_libc.calls == [(-3, 1 << 30), (-1, 1 << 30), (-8, 1)]  # M_MMAP_, M_TRIM_THRESHOLD, M_ARENA_MAX


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"])
def test_the_users_own_settings_win(fake_libc: FakeLibc, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "65536")
    assert allocator.keep_freed_memory() == "user settings"
    assert fake_libc.calls == []


def test_nothing_is_done_off_glibc(fake_libc: FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() == "not glibc"
    assert fake_libc.calls == []


def test_a_refusal_is_reported(fake_libc: FakeLibc) -> None:
    fake_libc.result = 0
    assert allocator.keep_freed_memory() == "refused"


def test_the_server_setting_defaults_on_and_can_be_turned_off() -> None:
    assert parse_settings([]).malloc_tuning is True
    assert parse_settings(["--no-malloc-tuning"]).malloc_tuning is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize(("tuned", "mmapped"), [(False, True), (True, False)])
def test_on_real_glibc_a_20_mb_block_comes_from_the_heap_once_tuned(tuned: bool, mmapped: bool) -> None:
    """Independent of the module's own report: glibc's mallinfo2 says whether a fresh 20 MB block was mmapped."""
    script = textwrap.dedent(
        f"""
        import ctypes
        from server.allocator import keep_freed_memory
        if {tuned}:
            assert keep_freed_memory() == "set"
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.mallinfo2.restype = Info
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(20 << 20)
        print(libc.mallinfo2().hblkhd - before >= 20 << 20)
        """
    )
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(mmapped)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("tuned", [False, True])
def test_on_real_glibc_a_new_threads_block_comes_from_the_main_heap_once_tuned(tuned: bool) -> None:
    """Independent of the module's own report: where a 1 MB block malloc'd in a new thread lies. The main arena's
    heap is the brk segment (below ``sbrk(0)``); a thread's own arena is mmapped far above it."""
    script = textwrap.dedent(
        f"""
        import ctypes, threading
        from server.allocator import keep_freed_memory
        if {tuned}:
            assert keep_freed_memory() == "set"
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.sbrk.restype = ctypes.c_void_p
        libc.sbrk.argtypes = [ctypes.c_ssize_t]
        where = []
        def allocate():
            block = libc.malloc(1 << 20)
            where.append(block < libc.sbrk(0))
        for _ in range(4):  # new threads in turn: without a cap glibc gives them arenas of their own
            thread = threading.Thread(target=allocate)
            thread.start()
            thread.join()
        print(all(where))
        """
    )
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tuned)
