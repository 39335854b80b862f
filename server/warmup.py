"""``--compile-warmup``: compile the decode graphs that default requests need before the server reports ready.

With ``--compile-decode`` each new edit set and batch shape compiles on first use, and every stream waits meanwhile
(about a minute per graph on the development CPU). A server that warms up runs, before ``/health`` is ok, the
requests that need the graphs most traffic uses: the base model, then each loaded adapter at its defaults (its
selected layers, ``default_alpha``, ``default_scope``, ``default_edit_tokens``), each alone and as two rows at once
(a batch of one row has a graph of its own). An adapter whose default stops editing after N tokens then runs the
unedited step, the base model's graph, compiled first (its warm-up request runs past N all the same). Requests
with ``return_stats`` use graphs of their own, not warmed up. Graphs past ``--compile-max-graphs`` are not
compiled (those steps run eagerly), so the warm-up is bounded like the traffic.

The warm-up requests go through :meth:`Engine.generate` like any other (greedy, four prompt tokens), so what they
compile is exactly what a request with the same edit compiles; nothing they produce is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from hpr.edit_spec import EditSpec
from hpr.registry import AdapterRegistry
from server.engine.types import GenerationOutput, GenerationRequest, SamplingParams


class Generates(Protocol):
    """What the warm-up needs of an engine (server.runtime.EngineLike has it)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...


log = logging.getLogger(__name__)

PROMPT = [1, 2, 3, 4]  # token ids: any valid ones compile the same graph


def warmup_edits(registry: AdapterRegistry) -> list[EditSpec | None]:
    """The edits to warm up, in order: none (the base model), then each loaded adapter's defaults."""
    return [None, *(registry.resolve(name) for name in sorted(registry.names()))]


async def _drain(engine: Generates, request: GenerationRequest) -> None:
    async for _ in engine.generate(request):
        pass


async def warm_up(engine: Generates, registry: AdapterRegistry) -> float:
    """Run the warm-up requests (module docstring) on ``engine``, for the adapters in ``registry``; returns the
    seconds taken."""
    started = time.monotonic()
    for index, spec in enumerate(warmup_edits(registry)):
        # Past the edit's token limit the step is the unedited one: run a few steps beyond it.
        steps = (spec.tokens if spec is not None and spec.tokens is not None else 1) + 2
        for rows in (1, 2):
            t = time.monotonic()
            sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
            requests = [
                GenerationRequest(f"warmup-{index}-{rows}-{row}", list(PROMPT), sampling, edit=spec)
                for row in range(rows)
            ]
            await asyncio.gather(*(_drain(engine, r) for r in requests))
            what = "no edit" if spec is None else f"adapter {spec.adapter!r} at its defaults"
            log.info("compile warm-up: %s, %d row(s): %.1f s", what, rows, time.monotonic() - t)
    seconds = time.monotonic() - started
    log.info("compile warm-up done in %.1f s", seconds)
    return seconds
