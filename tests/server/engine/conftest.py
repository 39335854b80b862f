"""Engine fixtures: the tiny llama + tiny tokenizer in memory, an editor with two random adapters, a runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch

from hpr.editing import HPREditor
from hpr.model import LoadedModel
from server.engine.engine import Engine
from server.engine.types import GenerationOutput, GenerationRequest
from tests.conftest import make_random_adapter, make_tiny_llama
from tests.server.conftest import make_tiny_tokenizer

T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a shared CPU every op then waits at an OpenMP
    barrier (measured: 0.4 s with 1 thread vs 63 s with 2 for one test). Restored after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(seed=0, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id="tiny-llama",
        source="memory",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


@pytest.fixture(scope="session")
def tiny_editor(tiny_loaded: LoadedModel) -> HPREditor:
    """Adapters ``tiny`` (seed 0) and ``other`` (seed 1), both trained on layers 0-3, selected 0-1."""
    return HPREditor(tiny_loaded.model, {"tiny": make_random_adapter(seed=0), "other": make_random_adapter(seed=1)})


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(request)]


def joined(outputs: list[GenerationOutput]) -> tuple[list[int], str]:
    return [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs)


@pytest.fixture
def make_engine(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> Callable[..., Any]:
    """``async with make_engine(**kwargs) as engine``: a started engine, stopped on exit."""

    class _Ctx:
        def __init__(self, **kwargs: Any) -> None:
            self.engine = Engine(tiny_loaded, tiny_editor.registry, **kwargs)

        async def __aenter__(self) -> Engine:
            self.engine.start()
            return self.engine

        async def __aexit__(self, *exc: object) -> None:
            await self.engine.stop(drain_timeout=10)

    return _Ctx


async def aiter_outputs(it: AsyncIterator[GenerationOutput]) -> list[GenerationOutput]:
    return [o async for o in it]


class StepSizes:
    """Engine observer recording the rows of every step: proof that requests shared forward passes. ``inner``: an
    observer (the server's metrics) that still gets every call."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def on_step(self, batch_size: int) -> None:
        self.sizes.append(batch_size)
        if self.inner is not None:
            self.inner.on_step(batch_size)

    def __getattr__(self, name: str) -> Any:  # on_first_token, on_token, on_finish, on_edit
        if self.inner is not None:
            return getattr(self.inner, name)
        return lambda *_args: None


def count_steps(engine: Engine, calls: list[str]) -> None:
    """Record the runner's separate prefill chunks, decode steps and mixed forwards ("chunk", "decode", "mixed")."""
    runner = engine.runner
    chunk, decode, mixed = runner._prefill_chunk, runner.decode, runner.mixed_step

    def counting_chunk(job: Any) -> Any:
        calls.append("chunk")
        return chunk(job)

    def counting_decode(batch: Any) -> Any:
        calls.append("decode")
        return decode(batch)

    def counting_mixed(batch: Any, job: Any) -> Any:
        calls.append("mixed")
        return mixed(batch, job)

    runner._prefill_chunk = counting_chunk  # type: ignore[method-assign]
    runner.decode = counting_decode  # type: ignore[method-assign]
    runner.mixed_step = counting_mixed  # type: ignore[method-assign]
