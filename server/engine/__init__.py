"""The batching engine: continuous batching over one model, each row with its own HPR edit.

The HTTP layer talks to it only through :class:`Engine` and the dataclasses in :mod:`server.engine.types`.
"""

from server.engine.types import (
    EngineError,
    EngineObserver,
    EngineStoppedError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "EngineError",
    "EngineObserver",
    "EngineStoppedError",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequestError",
    "ModelInfo",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "TokenLogprob",
]
