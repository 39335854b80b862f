"""A scripted stand-in for ``server.engine.engine.Engine`` (same interface), to test the HTTP layer alone.

It "generates" the characters of :data:`SCRIPT` one token per step (then stops, as at an eos token, unless
``ignore_eos``), honours ``max_tokens``, stop strings, logprobs, prompt logprobs and edit stats, bounds running +
queued requests like the real engine (``QueueFullError``), and records every request it saw and every request
that was cancelled before it finished. A prompt containing ``FAIL`` makes the request fail after two tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from hpr.edit_stats import EditStats, LayerEditStats
from hpr.model import load_model
from hpr.registry import AdapterRegistry
from server.engine.types import (
    EngineObserver,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    PromptTooLongError,
    QueueFullError,
    TokenLogprob,
)
from server.settings import ServerSettings

SCRIPT = "Hello world!"
TOKEN_LOGPROB = -0.5
PROMPT_LOGPROB = -1.0


class FakeEngine:
    """An engine factory too: ``FakeEngine(settings, registry)`` loads the (tiny) model named by the settings."""

    def __init__(self, settings: ServerSettings, registry: AdapterRegistry, step_delay: float = 0.0):
        loaded = load_model(settings.model, "cpu", "float32", model_id=settings.served_model_name)
        self.info = ModelInfo.from_loaded(loaded, settings.max_model_len)
        registry.bind(self.info.hidden_size, self.info.num_layers, torch.device("cpu"))
        self.tokenizer: Any = loaded.tokenizer
        self.max_batch_size = settings.max_batch_size
        self.max_queue = settings.max_queue
        self.max_model_len = self.info.max_model_len
        self.step_delay = step_delay
        self.observer: EngineObserver | None = None
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.active: set[str] = set()
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    async def stop(self, drain_timeout: float = 30.0) -> None:
        self.stopped = True

    @property
    def running(self) -> int:
        return min(len(self.active), self.max_batch_size)

    @property
    def queue_depth(self) -> int:
        return max(0, len(self.active) - self.max_batch_size)

    def _token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def _logprob(self, token_id: int, logprob: float, k: int) -> TokenLogprob:
        top = [(token_id, self._token(token_id), logprob)] + [
            (alt, self._token(alt), logprob - 1.0 - i) for i, alt in enumerate(range(10, 10 + k - 1))
        ]
        return TokenLogprob(token_id=token_id, token=self._token(token_id), logprob=logprob, top=top[:k])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self.stopped:
            raise EngineStoppedError("engine stopped")
        if len(request.prompt_ids) > self.max_model_len:
            raise PromptTooLongError("prompt too long", "prompt")
        if len(self.active) >= self.max_batch_size + self.max_queue:
            raise QueueFullError("queue full", retry_after=2.5)
        self.requests.append(request)
        self.active.add(request.request_id)
        sampling = request.sampling
        prompt_text = str(self.tokenizer.decode(request.prompt_ids))
        finished = False
        started = time.monotonic()
        try:
            prompt_logprobs = None
            if sampling.prompt_logprobs:
                k = sampling.logprobs or 0
                prompt_logprobs = [None] + [self._logprob(t, PROMPT_LOGPROB, k) for t in request.prompt_ids[1:]]
            script_ids = list(self.tokenizer(SCRIPT, add_special_tokens=False)["input_ids"])
            text = ""
            n = 0
            room = self.max_model_len - len(request.prompt_ids)
            while True:
                if sampling.max_tokens == 0:
                    reason = "length"
                    out = GenerationOutput(request.request_id, [], "", prompt_logprobs=prompt_logprobs)
                    break
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                else:
                    await asyncio.sleep(0)
                if "FAIL" in prompt_text and n == 2:
                    raise RuntimeError("scripted failure")
                token = script_ids[n % len(script_ids)]
                n += 1
                piece = self._token(token)
                text += piece
                reason: str | None = None
                for stop in sampling.stop:
                    if stop in text:
                        piece = piece[: len(piece) - (len(text) - text.index(stop))]
                        reason = "stop"
                if reason is None and n == len(script_ids) and not sampling.ignore_eos:
                    reason = "stop"
                if reason is None and (n >= sampling.max_tokens or n >= room):
                    reason = "length"
                if self.observer is not None:
                    self.observer.on_step(len(self.active))
                    if n == 1:
                        self.observer.on_first_token(request.request_id, time.monotonic() - started)
                    else:
                        self.observer.on_token(request.request_id, 0.001)
                out = GenerationOutput(
                    request.request_id,
                    [token],
                    piece,
                    logprobs=[self._logprob(token, TOKEN_LOGPROB, sampling.logprobs)]
                    if sampling.logprobs is not None
                    else None,
                    prompt_logprobs=prompt_logprobs if n == 1 else None,
                    finish_reason=None,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=n,
                )
                if reason is not None:
                    break
                yield out
            out.finish_reason = reason  # type: ignore[assignment]
            out.prompt_tokens = len(request.prompt_ids)
            if request.return_stats and request.edit is not None:
                total = len(request.prompt_ids) + n
                out.edit_stats = EditStats(
                    {layer: LayerEditStats(tokens=total, changed=1, amount_sum=0.25) for layer in request.edit.layers}
                )
            if self.observer is not None:
                self.observer.on_finish(request.request_id, len(request.prompt_ids), n)
                if request.edit is not None:
                    for layer in request.edit.layers:
                        self.observer.on_edit(layer, len(request.prompt_ids) + n)
            finished = True
            yield out
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.cancelled.append(request.request_id)
