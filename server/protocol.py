"""OpenAI-compatible request/response models (pydantic only; the logic lives in :mod:`server.serving`).

OpenAI's fields come first, in the order of the OpenAI API reference; our extensions follow, each with a
``description``. Unknown request fields are ignored (as OpenAI-compatible servers do), so newer SDKs keep working.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- the `hpr` extension -----------------------------------------------------------------------------------------


class HPRRequest(OpenAIModel):
    """Per-request HPR edit (``extra_body={"hpr": {...}}`` in the OpenAI SDKs)."""

    adapter: str | None = Field(
        default=None, description="Adapter id to edit with. Default: the adapter named by `model`, if it names one."
    )
    layers: str | list[StrictInt] = Field(
        default="selected",
        description="'selected' (the adapter's chosen layers), 'all' (every trained layer), 'none', "
        "a list of layer indices, or a string such as '10-14,20'.",
    )
    alpha: float | None = Field(
        default=None,
        description="Edit strength in [0, 4]; 0 leaves activations unchanged. Default: the adapter's `default_alpha` "
        "(the strength its training evaluated; 1 for checkpoints that do not record one).",
    )
    scope: Literal["all", "generated"] | None = Field(
        default=None,
        description="'all' edits every position; 'generated' only the last prompt token and generated ones. "
        "Default: the adapter's `default_scope` ('all' for checkpoints that do not record one).",
    )
    return_stats: bool = Field(default=False, description="Return per-layer edit statistics with each choice.")


class HPRLayerStats(OpenAIModel):
    tokens: int = Field(description="Token positions the edit looked at in this layer (scope applied).")
    rotated: int = Field(description="Of those, positions the probe judged negative and rotated.")
    share_rotated: float = Field(description="rotated / tokens (0 when tokens is 0).")
    mean_angle: float = Field(description="Mean rotation angle over rotated positions, in radians.")


class HPRApplied(OpenAIModel):
    """The edit that was actually applied to every choice of the response."""

    adapter: str
    layers: list[int]
    alpha: float
    scope: Literal["all", "generated"]


# --- shared --------------------------------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def count(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hpr-serve"
    root: str | None = Field(default=None, description="Where the model or adapter was loaded from.")
    parent: str | None = Field(default=None, description="For an adapter: the id of the base model it edits.")
    max_model_len: int | None = Field(default=None, description="Context length (prompt + generated tokens).")
    hpr: dict[str, Any] | None = Field(
        default=None, description="For an adapter: trained layers, selected layers and their probe accuracy."
    )


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# --- chat completions ----------------------------------------------------------------------------------------------


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int = Field(default=1, ge=1, le=64)
    presence_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = 1.0
    top_logprobs: int | None = None
    top_p: float = 1.0
    user: str | None = None
    # extensions
    top_k: int = Field(default=0, description="Sample from the k most likely tokens only (0 = off).")
    min_p: float = Field(default=0.0, description="Drop tokens whose probability is below min_p × the top probability.")
    repetition_penalty: float = Field(
        default=1.0, description="Multiplicative penalty on tokens already seen (1 = off)."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token (benchmarks).")
    stop_token_ids: list[int] | None = Field(default=None, description="Token ids that end generation, besides eos.")
    hpr: HPRRequest | None = Field(default=None, description="Per-request HPR edit; see docs/server.md.")


class ChatLogprobTop(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[ChatLogprob] | None = None
    refusal: list[ChatLogprob] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    hpr_stats: dict[str, HPRLayerStats] | None = Field(
        default=None, description="Per-layer edit statistics (return_stats)."
    )


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo
    hpr: HPRApplied | None = Field(default=None, description="The HPR edit applied (null: the base model, unedited).")


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    hpr_stats: dict[str, HPRLayerStats] | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    hpr: HPRApplied | None = None


# --- (legacy) completions ------------------------------------------------------------------------------------------


class CompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool = False
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = Field(default=1, ge=1, le=64)
    presence_penalty: float = 0.0
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    user: str | None = None
    # extensions
    top_k: int = Field(default=0, description="Sample from the k most likely tokens only (0 = off).")
    min_p: float = Field(default=0.0, description="Drop tokens whose probability is below min_p × the top probability.")
    repetition_penalty: float = Field(
        default=1.0, description="Multiplicative penalty on tokens already seen (1 = off)."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token (benchmarks).")
    stop_token_ids: list[int] | None = Field(default=None, description="Token ids that end generation, besides eos.")
    hpr: HPRRequest | None = Field(default=None, description="Per-request HPR edit; see docs/server.md.")


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    hpr_stats: dict[str, HPRLayerStats] | None = Field(
        default=None, description="Per-layer edit statistics (return_stats)."
    )


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo
    hpr: HPRApplied | None = Field(default=None, description="The HPR edit applied (null: the base model, unedited).")


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    hpr: HPRApplied | None = None
