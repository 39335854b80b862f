"""SSE payloads in OpenAI's stream format: chunk JSON, one error frame on failure, then ``[DONE]``."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from server.errors import to_api_error

log = logging.getLogger(__name__)

DONE = "[DONE]"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def chunk_json(chunk: BaseModel) -> str:
    """Compact chunk JSON: unset optionals are left out, but every choice keeps ``finish_reason`` (null until the
    end) and ``logprobs``, which OpenAI always sends."""
    data: dict[str, Any] = chunk.model_dump(exclude_none=True)
    for choice in data.get("choices", []):
        choice.setdefault("logprobs", None)
        choice.setdefault("finish_reason", None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def with_error_frame(frames: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass ``frames`` through; an exception mid-stream becomes one ``{"error": ...}`` frame. Always ends with
    ``[DONE]`` unless the client is gone (cancellation propagates, closing the generations)."""
    try:
        async for frame in frames:
            yield frame
    except Exception as exc:
        error = to_api_error(exc)
        log.warning("stream failed: %s", error.message)
        yield json.dumps(error.body(), ensure_ascii=False)
    yield DONE
