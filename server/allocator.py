"""glibc's allocator set to keep freed memory in the process, for a server of large, short-lived tensors.

By default glibc hands every block above a dynamic threshold (128 kB, rising to at most 32 MB) to ``mmap`` and
gives it back to the OS on free, and trims the heap's free top. A running batch's KV cache is rebuilt whenever rows
join or leave (~0.9 GB for 32 rows of 600 tokens of SmolLM2 in fp32, 30 buffers of ~20-30 MB), and each rebuild
then page-faults fresh memory in from the OS. Measured here (``experiments/kv_join.py``, 2 threads, ABBA): join + filter
of that cache took 205 ms (median) with freed memory kept against 322 ms with glibc's defaults, the first one 0.68 s
against 1.36 s; the worst after the first was no better (1.3 s against 0.8 s). In the engine with 32 streams and
8 arriving 512-token prompts (``bench/chunked_prefill.py``), the longest pause did not change measurably and the
quiet decode was 2.5 % faster (docs/benchmarks.md).

It also caps glibc at **one arena**. By default each thread that allocates gets an arena of its own, made of
64 MB heaps: the engine thread's KV buffers (tens of MB each) then come from heaps that glibc unmaps when they
empty, or straight from ``mmap`` when they do not fit, so memory the process freed is faulted in afresh, and on
this virtual machine a page fault costs 1 µs or 20-40 µs depending on whether the host still backs the page. With
the one (brk) heap that the thresholds keep, freed buffers are reused. Measured (``bench/chunked_prefill.py``, 32
streams, 8 newcomers of 512 tokens, ABBA by process): with the KV cache allocated for its rows' budgets, the
second round's longest pause was 2.8-4.0 s (a join faulting 135,000 pages at ~20 µs) with an arena per thread,
0.25-0.31 s with one arena, and no engine call above 0.5 s; peak RSS 4.0 → 3.3 GB (docs/benchmarks.md,
"Decoding without growth").

``keep_freed_memory`` sets all three with ``mallopt``, process-wide, once at startup (the server calls it first
thing, before its threads start: a thread that already has an arena keeps it). It does nothing when the user set
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_ARENA_MAX`` (theirs win), or off glibc (e.g.
musl, macOS). The cost: memory freed after a peak stays in the process (its RSS does not shrink back) for reuse,
and threads that allocate at once share one arena's lock (the engine thread does nearly all of it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Literal

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30  # blocks below 1 GiB come from the heap; the heap's free top is kept up to 1 GiB
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")

Outcome = Literal["set", "user settings", "not glibc", "refused"]


def keep_freed_memory() -> Outcome:
    """Keep freed memory for reuse (see the module docstring); what was done, also logged."""
    outcome = _apply()
    kept = f"freed memory kept (thresholds {KEEP_BYTES} B, one arena)"
    log.info("glibc malloc: %s", outcome if outcome != "set" else kept)
    return outcome


def _apply() -> Outcome:
    if any(name in os.environ for name in USER_SETTINGS):
        return "user settings"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the libc this process already runs on
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either fixes both (no more dynamic threshold), and a trim threshold alone
    # would leave every block above 128 kB to mmap, slower than glibc's defaults (measured).
    settings = ((M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_ARENA_MAX, 1))
    if any(mallopt(option, value) != 1 for option, value in settings):
        return "refused"
    return "set"
