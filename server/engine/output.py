"""Consumer-side assembly of :class:`GenerationOutput` events from the engine thread's raw events.

Runs in the request's event loop: incremental detokenization, stop strings and logprob token texts all happen
here, concurrently with the engine thread's next forward pass. Edit statistics pass through as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hpr.edit_stats import EditStats
from server.engine.batch import EngineEvent, RequestState
from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from server.engine.types import FinishReason, GenerationOutput, TokenLogprob


class OutputBuilder:
    """Turns the raw events of one request into its outputs. ``finished`` once the last output is built.

    After a stop string is found (``stop_hit``), the text is final; later tokens are ignored, and the engine's
    closing event (finish reason and stats) completes the request.
    """

    def __init__(self, state: RequestState, tokenizer: Any, token_text: Callable[[int], str]) -> None:
        self.state = state
        self.token_text = token_text
        self.detokenizer = IncrementalDetokenizer(tokenizer, state.request.prompt_ids)
        self.stopper = StopStringMatcher(state.request.sampling.stop)
        self.completion_tokens = 0
        self.stop_hit = False
        self.finished = False

    def _logprob(self, item: tuple[int, float, list[tuple[int, float]]]) -> TokenLogprob:
        token, value, top = item
        return TokenLogprob(
            token_id=token,
            token=self.token_text(token),
            logprob=value,
            top=[(t, self.token_text(t), v) for t, v in top],
        )

    def build(self, events: Sequence[EngineEvent]) -> GenerationOutput | None:
        """One output merging ``events`` (several when the consumer fell behind); None if nothing to say."""
        request = self.state.request
        tokens: list[int] = []
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        prompt_logprobs: list[TokenLogprob | None] | None = None
        finish: FinishReason | None = None
        stats: EditStats | None = None
        for event in events:
            if event.error is not None:
                self.finished = True
                raise event.error
            if event.prompt_logprobs is not None:
                prompt_logprobs = [None if item is None else self._logprob(item) for item in event.prompt_logprobs]
            for j, token in enumerate(event.token_ids):
                if self.stop_hit:
                    break
                self.completion_tokens += 1
                tokens.append(token)
                if event.logprobs is not None:
                    logprobs.append(self._logprob(event.logprobs[j]))
                emitted, stopped = self.stopper.feed(self.detokenizer.add(token))
                text.append(emitted)
                if stopped:
                    self.stop_hit = True
            if event.finish_reason is not None:
                finish = "stop" if self.stop_hit else event.finish_reason
                stats = event.edit_stats
                break
        if finish is not None and not self.stop_hit:
            emitted, stopped = self.stopper.feed(self.detokenizer.flush())
            text.append(emitted)
            if stopped:
                finish = "stop"
            else:
                text.append(self.stopper.flush())
        if finish is not None:
            self.finished = True
        elif not tokens and prompt_logprobs is None:
            return None
        return GenerationOutput(
            request_id=request.request_id,
            token_ids=tokens,
            text="".join(text),
            logprobs=logprobs if request.sampling.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=self.completion_tokens,
            edit_stats=stats if request.return_stats and finish is not None else None,
        )
