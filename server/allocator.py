"""glibc's allocator set to keep freed memory in the process, for a server of large, short-lived tensors.

By default glibc hands every block above a dynamic threshold (128 kB, rising to at most 32 MB) to ``mmap`` and
gives it back to the OS on free, and trims the heap's free top. A running batch's KV cache is rebuilt whenever rows
join or leave (~0.9 GB for 32 rows of 600 tokens of SmolLM2 in fp32, 30 buffers of ~20-30 MB), and each rebuild
then page-faults fresh memory in from the OS. Measured here (``bench/kv_join.py``, 2 threads, ABBA): join + filter
of that cache took 205 ms (median) with freed memory kept against 322 ms with glibc's defaults, the first one 0.68 s
against 1.36 s; the worst after the first was no better (1.3 s against 0.8 s). In the engine with 32 streams and
8 arriving 512-token prompts (``bench/chunked_prefill.py``), the longest pause did not change measurably and the
quiet decode was 2.5 % faster (docs/benchmarks.md).

``keep_freed_memory`` raises both thresholds with ``mallopt``, process-wide, once at startup. It does nothing when
the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (theirs win), or off glibc (e.g. musl,
macOS). The cost: memory freed after a peak stays in the process (its RSS does not shrink back) for reuse.
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
KEEP_BYTES = 1 << 30  # blocks below 1 GiB come from the heap; the heap's free top is kept up to 1 GiB
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

Outcome = Literal["set", "user settings", "not glibc", "refused"]


def keep_freed_memory() -> Outcome:
    """Keep freed memory for reuse (see the module docstring); what was done, also logged."""
    outcome = _apply()
    log.info("glibc malloc: %s", outcome if outcome != "set" else f"freed memory kept (thresholds {KEEP_BYTES} B)")
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
    if mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) != 1:
        return "refused"
    return "set"
