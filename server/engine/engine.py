"""The engine: one model, one engine thread doing continuous batching, an asyncio front.

Each loop iteration of the engine thread (1) drops rows whose client left or that hit a stop string, (2) prefills
waiting requests while the running batch has room (several at once, left-padded; with ``prefill_chunk``, one
chunk of their prompts per iteration) and joins them to it once prefilled, and (3) runs ONE forward pass over
every running row, each row with its own HPR edit, and picks one token per row. With ``mixed_prefill``, (2) and (3)
are one forward: the decode step and the chunk together.
Results go to each request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe`` (once per loop per step);
the consumer side (:meth:`Engine.generate`) turns token ids into text and applies stop strings, so tokenizer
work stays off the engine thread.

Context length: a prompt that does not fit ``max_model_len`` (or leaves no room for one token) is refused with
:class:`PromptTooLongError`; otherwise generation is clamped to the room left and then finishes with ``length``.

Queue: ``max_queue`` bounds requests waiting beyond the free slots of the running batch, so ``max_queue=0``
admits a request while a slot is free and refuses it (:class:`QueueFullError`) when the batch is full.

CPU deployment notes (measured on a shared 2-core box): with more torch threads than idle cores, every op waits at
an OpenMP barrier (1 thread was 2-10× faster there); and glibc returning large activation and KV-cache buffers to
the OS makes each big op page-fault. Neither is the engine's to set, being process-wide: the server sets both at
startup (``--num-threads``; ``--malloc-tuning``, :mod:`server.allocator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from hpr.edit_stats import EditStatsCounter
from hpr.editing import HPREditor
from hpr.model import LoadedModel
from hpr.registry import AdapterRegistry
from server.engine.batch import Batch, EngineEvent, RequestState
from server.engine.grammar import new_matcher
from server.engine.output import OutputBuilder
from server.engine.runner import ModelRunner, PrefillJob, StepOutcome
from server.engine.sampling import new_generator
from server.engine.types import (
    DEFAULT_PREFILL_CHUNK,
    MAX_GRAPHS,
    EngineObserver,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    QueueFullError,
    check_request,
)

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation over ``loaded.model`` (in-process Hugging Face transformers) with per-row
    edits by the adapters of ``registry`` (bound here to the model; the engine installs its own hooks).

    Publishes :attr:`info` (:class:`ModelInfo`). A request holds a lease on its adapter from admission to its
    end, so an adapter unloaded meanwhile stays until the request is done.

    Args:
        max_batch_size: rows decoded together at most.
        max_queue: requests waiting for a slot at most (beyond those a free slot takes at the next step); past
            that :class:`QueueFullError`.
        max_model_len: prompt + generated tokens at most (default: the model's context).
        max_prefill_tokens: padded prompt tokens prefilled in one forward at most (bounds the pause that
            newcomers impose on running streams); a longer single prompt is still prefilled alone.
        gather_window: seconds an idle engine waits, after a request arrives, for others to join its first
            step: the columns of an A/B comparison, or a client's concurrent requests, sent a few ms apart, then
            start together instead of one a whole prefill behind the other. Costs a lone request that much TTFT.
        prefill_chunk: prompt tokens (summed over the newcomers prefilled together) per prefill forward at most;
            a longer prefill runs in chunks, one between two decode steps of the running streams, so their
            inter-token latency stays bounded while newcomers arrive (chunked prefill). None: whole prompts.
        mixed_prefill: run each chunk (or whole prompt) in the same forward as the running streams' decode step,
            where the model allows it (:mod:`server.engine.mixed`): the weights are read once for both, so the
            streams' step grows by the chunk's arithmetic only. False: a forward of its own.
        max_step_tokens: tokens one step may process, the running streams' one each and a chunk's prompt tokens
            (vLLM's ``max_num_batched_tokens``): a chunk takes what the running rows leave, at least one column per
            newcomer, and at most ``prefill_chunk``. Where a step's time grows with its tokens (a CPU), this bounds
            the running streams' pause while newcomers arrive whatever their number; None: ``prefill_chunk`` alone.
        compile_decode: run decode steps through one ``torch.compile``'d graph with the edits inline
            (:mod:`server.engine.compiled`; models with Llama's loop, SDPA, no sliding window). The first step of a new
            batch shape or edit set compiles (tens of seconds on a CPU). False: the eager forward.
        compile_max_graphs: with ``compile_decode``, compile at most this many graphs (one per edit set, with
            statistics or not, one row or more); steps that would need another run eagerly. On a CPU each graph
            holds a packed copy of the weights (0.65-0.8 GB for SmolLM2 in fp32).
        compile_autotune: with ``compile_decode``, inductor benchmarks its own matmul kernels against the library's
            when it compiles (``mode="max-autotune-no-cudagraphs"``): faster steps, longer compiles.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        registry: AdapterRegistry,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 4096,
        observer: EngineObserver | None = None,
        gather_window: float = 0.01,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        mixed_prefill: bool = True,
        max_step_tokens: int | None = None,
        compile_decode: bool = False,
        compile_max_graphs: int = MAX_GRAPHS,
        compile_autotune: bool = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be ≥ 1 and max_queue ≥ 0")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be ≥ 1 (or None: whole prompts)")
        if max_step_tokens is not None and max_step_tokens < 1:
            raise ValueError("max_step_tokens must be ≥ 1 (or None: no budget)")
        self.loaded = loaded
        self.info = ModelInfo.from_loaded(loaded, max_model_len)
        self.registry = registry
        self.editor = HPREditor(loaded.model, registry)  # binds the registry to the model's shape and device
        self.tokenizer = loaded.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_model_len = self.info.max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.gather_window = gather_window
        self.prefill_chunk = prefill_chunk
        self.mixed_prefill = mixed_prefill  # a chunk shares its forward with the running batch's decode step
        self.max_step_tokens = max_step_tokens
        self.observer = observer
        self.vocab_size = self.info.vocab_size
        self.eos_ids = _eos_ids(loaded)
        pad_id = self.tokenizer.pad_token_id
        self.runner = ModelRunner(
            loaded.model,
            self.editor,
            pad_id=int(pad_id) if pad_id is not None else 0,
            vocab_size=self.vocab_size,
            on_edit=self._on_edit,
            compile_decode=compile_decode,
            compile_max_graphs=compile_max_graphs,
            compile_autotune=compile_autotune,
        )
        self._token_text: dict[int, str] = {}
        self._lock = threading.Condition()
        self._waiting: deque[RequestState] = deque()
        self._active: set[RequestState] = set()  # admitted (prefilled or being prefilled), not done
        self._thread: threading.Thread | None = None
        self._stopping = False  # refuse new requests, finish running ones
        self._abort = False  # fail running requests and exit
        self._exited = threading.Event()

    # ---- public API -----------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._loop, name="hpr-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new and queued requests, let running ones finish (up to ``drain_timeout`` s), then exit."""
        with self._lock:
            self._stopping = True
            refused = list(self._waiting)
            self._waiting.clear()
            self._lock.notify_all()
        for state in refused:
            state.finish()
            self._deliver([(state, EngineEvent(error=EngineStoppedError("the server is shutting down")))])
        if self._thread is None:
            self.editor.detach()
            return
        drained = await asyncio.to_thread(self._exited.wait, drain_timeout)
        if not drained:
            with self._lock:
                self._abort = True
                self._lock.notify_all()
            await asyncio.to_thread(self._exited.wait)
        await asyncio.to_thread(self._thread.join)
        self.editor.detach()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the outputs of ``request``. Validation and queueing happen on the first ``__anext__``.

        Closing the iterator (or cancelling the task awaiting it) cancels the request within one engine step.
        """
        state = self._submit(request)
        builder = OutputBuilder(state, self.tokenizer, self.token_text)
        try:
            while True:
                events = [await state.queue.get()]
                while not state.queue.empty():
                    events.append(state.queue.get_nowait())
                output = builder.build(events)
                if builder.stop_hit and not state.cancelled:
                    # a stop string ended the text: the engine finishes the row (with stats) at its next step
                    state.completion_tokens_seen = builder.completion_tokens
                    state.cancelled = True
                    self._wake()
                if output is not None:
                    yield output
                if builder.finished:
                    return
        finally:
            if not state.done and not state.cancelled:
                state.cancelled = True
                with self._lock:
                    if state in self._waiting:  # never started: free its queue place now
                        self._waiting.remove(state)
                        state.finish()
                    self._lock.notify_all()

    def token_text(self, token_id: int) -> str:
        """Text of one token, as shown in logprobs (cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    # ---- submission -----------------------------------------------------------------------------------------
    def _submit(self, request: GenerationRequest) -> RequestState:
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise EngineStoppedError("the engine is not running")
        edit, room = check_request(request, self.info)
        sampling = request.sampling
        stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self.eos_ids)
        state = RequestState(
            request=request,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            generator=new_generator(sampling.seed),
            stop_ids=stop_ids,
            max_new_tokens=min(sampling.max_tokens, room),
            stats=EditStatsCounter(edit.layers) if edit is not None and request.return_stats else None,
            matcher=new_matcher(request.constraint),
        )
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            free_slots = max(0, self.max_batch_size - len(self._active))  # these are admitted at the next step
            if len(self._waiting) - free_slots >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} requests waiting); retry later", retry_after=1.0
                )
            if edit is not None:  # the one check that the adapter exists: UnknownAdapterError if it is gone
                self.registry.acquire(edit.adapter)
                state.lease = self.registry
            self._waiting.append(state)
            self._lock.notify_all()
        return state

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- engine thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        batch: Batch | None = None
        job: PrefillJob | None = None  # newcomers being prefilled, a chunk per iteration
        try:
            with torch.inference_mode():
                while True:
                    newcomers: list[RequestState] = []
                    with self._lock:
                        while not self._waiting and batch is None and job is None and not self._stopping:
                            self._lock.wait()
                        if self._abort or (self._stopping and batch is None and job is None and not self._waiting):
                            break
                        if job is None:
                            room = self.max_batch_size - (len(batch) if batch is not None else 0)
                            if batch is None:
                                self._gather(room)
                            newcomers = self._take_newcomers(room)
                    batch = self._drop_cancelled(batch)
                    if newcomers:
                        job = self.runner.start_prefill(newcomers, self.prefill_chunk)
                    if job is not None and all(st.cancelled for st in job.states):
                        self._abandon(job)  # every client has left: stop prefilling
                        job = None
                    if job is not None and self.max_step_tokens is not None:
                        job.budget = self.max_step_tokens - (len(batch) if batch is not None else 0)
                    if job is not None and batch is not None and self.mixed_prefill and self.runner.can_mix(job):
                        size = len(batch)
                        decoded, prefilled = self.runner.mixed_step(batch, job)  # one forward for both
                        batch = self._apply(decoded, size)
                        if prefilled is not None:  # the last chunk: the newcomers have their first tokens
                            job = None
                            batch = self._join(batch, prefilled)
                        continue
                    if job is not None:
                        outcome = self.runner.prefill_step(job)
                        if outcome is not None:  # the last chunk: the newcomers have their first tokens
                            job = None
                            batch = self._join(batch, outcome)
                    if batch is not None:
                        batch = self._apply(self.runner.decode(batch), len(batch))
        except BaseException as exc:  # the loop itself broke: fail everyone rather than hang them
            log.exception("engine loop crashed")
            self._fail_all(batch, exc)
            raise
        finally:
            self._fail_all(batch, EngineStoppedError("the engine stopped"))
            self._exited.set()

    def _gather(self, room: int) -> None:
        """Called with the lock held by an idle engine woken by a request: wait up to ``gather_window`` (the lock
        released meanwhile) for more to arrive, so that they are prefilled together."""
        deadline = time.monotonic() + self.gather_window
        while len(self._waiting) < room and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._lock.wait(left)

    def _take_newcomers(self, room: int) -> list[RequestState]:
        taken: list[RequestState] = []
        longest = 0
        while self._waiting and len(taken) < room:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                head.finish()
                continue
            longest_if = max(longest, head.prompt_len)
            if taken and longest_if * (len(taken) + 1) > self.max_prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            self._active.add(head)
            longest = longest_if
        return taken

    def _retire(self, state: RequestState, completion_tokens: int) -> None:
        """The request runs no more: let its slot and adapter go, and tell the observer."""
        state.finish()
        self._active.discard(state)
        if self.observer is not None:
            self._safe(self.observer.on_finish, state.request_id, state.prompt_len, completion_tokens)

    def _abandon(self, job: PrefillJob) -> None:
        for state in job.states:
            self._retire(state, 0)

    def _join(self, batch: Batch | None, outcome: StepOutcome) -> Batch | None:
        """Deliver a finished prefill's first tokens and join its rows to the running batch."""
        self._observe_tokens(outcome)
        joined = self._apply(outcome, None)
        parts = [b for b in (batch, joined) if b is not None]
        return Batch.concatenate(parts) if parts else None

    def _apply(self, outcome: StepOutcome, batch_size: int | None) -> Batch | None:
        """Deliver a step's events, report metrics, and return the batch to continue with."""
        if batch_size is not None:
            if self.observer is not None:
                self._safe(self.observer.on_step, batch_size)
            self._observe_tokens(outcome)
        for state in outcome.finished:
            self._retire(state, len(state.generated))
        self._deliver(outcome.events)
        return outcome.batch

    def _drop_cancelled(self, batch: Batch | None) -> Batch | None:
        if batch is None or not any(s.cancelled for s in batch.requests):
            return batch
        keep = [i for i, s in enumerate(batch.requests) if not s.cancelled]
        events: list[tuple[RequestState, EngineEvent]] = []
        for state in batch.requests:
            if not state.cancelled:
                continue
            completion = state.completion_tokens_seen
            self._retire(state, completion if completion is not None else len(state.generated))
            if completion is not None:  # stopped by a stop string: the consumer waits for this last event
                events.append((state, EngineEvent(finish_reason="stop", edit_stats=state.edit_stats())))
        self._deliver(events)
        return batch.filter(keep, in_place=True)  # `batch` is replaced by it: rows move, the cache is not copied

    def _observe_tokens(self, outcome: StepOutcome) -> None:
        if self.observer is None:
            return
        now = time.perf_counter()
        for state, event in outcome.events:
            if not event.token_ids:
                continue
            if state.last_token_time is None:
                self._safe(self.observer.on_first_token, state.request_id, now - state.arrival)
            else:
                self._safe(self.observer.on_token, state.request_id, now - state.last_token_time)
            state.last_token_time = now

    def _on_edit(self, layer: int, tokens: int) -> None:
        if self.observer is not None:
            self._safe(self.observer.on_edit, layer, tokens)

    def _fail_all(self, batch: Batch | None, error: BaseException) -> None:
        with self._lock:
            pending = list(self._waiting)
            self._waiting.clear()
        running = list(batch.requests) if batch is not None else []
        states = pending + running + [s for s in self._active if s not in running]  # e.g. mid-prefill
        events = [(s, EngineEvent(error=error)) for s in states if not s.done]
        for state, _ in events:
            state.finish()
        self._active.clear()
        self._deliver(events)

    @staticmethod
    def _safe(hook: Any, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("engine observer hook %s failed", getattr(hook, "__name__", hook))

    @staticmethod
    def _deliver(events: Sequence[tuple[RequestState, EngineEvent]]) -> None:
        """Hand events to their consumers: one ``call_soon_threadsafe`` per event loop, not per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, EngineEvent]]] = {}
        for state, event in events:
            by_loop.setdefault(state.loop, []).append((state, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestState, EngineEvent]]) -> None:
    for state, event in items:
        state.queue.put_nowait(event)


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    generation_config = getattr(loaded.model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(x) for x in configured)
    return frozenset(ids)
