"""Incremental detokenization and stop strings, run per request on the consumer side (off the engine thread).

Decoding one token at a time is wrong for tokenizers whose pieces depend on their neighbours (SentencePiece's
leading space, byte-level BPE splitting a UTF-8 character over several tokens). We keep TGI/vLLM's two offsets:
decode a small window ending at the new token, emit only what extends the text decoded so far, and wait while the
window ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens kept as left context so the first generated piece decodes right


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)
        return text

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end), decoded as is."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Finds the first stop string in a text stream; holds back any tail that could start one.

    ``feed(delta)`` returns ``(text_to_emit, stopped)``. Once stopped, the stop string and everything after it are
    dropped. ``flush()`` releases the held-back tail when the stream ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        window = self.held + delta
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return window[: min(hits)], True
        keep = 0  # the longest suffix of window that is a proper prefix of some stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(window)), keep, -1):
                if window.endswith(stop[:n]):
                    keep = n
                    break
        self.held = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
