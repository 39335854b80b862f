"""Engine :class:`TokenLogprob` lists → OpenAI's two logprobs formats (chat and legacy completions)."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.types import TokenLogprob
from server.protocol import ChatChoiceLogprobs, ChatLogprob, ChatLogprobTop, CompletionLogprobs


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_bytes(e.token),
                top_logprobs=[ChatLogprobTop(token=t, logprob=lp, bytes=_bytes(t)) for _id, t, lp in e.top],
            )
            for e in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], first_offset: int, first_token: str | None = None
) -> CompletionLogprobs:
    """Legacy format. ``None`` entries (the first prompt token has no logprob) get ``first_token`` as text.

    ``text_offset`` counts characters from the start of the returned text, starting at ``first_offset``.
    """
    out = CompletionLogprobs()
    offset = first_offset
    for e in entries:
        token = e.token if e is not None else (first_token or "")
        out.tokens.append(token)
        out.token_logprobs.append(e.logprob if e is not None else None)
        out.top_logprobs.append({t: lp for _id, t, lp in e.top} if e is not None else None)
        out.text_offset.append(offset)
        offset += len(token)
    return out
