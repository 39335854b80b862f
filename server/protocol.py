"""OpenAI-compatible request/response models (pydantic only; the logic lives in :mod:`server.serving`).

OpenAI's fields come first, in the order of the OpenAI API reference; our extensions follow, each with a
``description``. Unknown request fields are ignored (as OpenAI-compatible servers do), so newer SDKs keep working.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from hpr.householder import MAX_ALPHA


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """Request bodies are strict: ``true`` is no token id and ``"1"`` no number (the schema says so, too)."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _number_only(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)  # exactly, however large (pydantic refuses floats beyond 64 bits)
    return value


# A JSON integer: 3 or 3.0 (JSON Schema counts both as integers), never true, "3" or 3.5. The range goes in the
# same Field, before the validator, so the published schema shows it as minimum/maximum.
JSONInt = Annotated[int, Field(strict=False), BeforeValidator(_number_only)]
PositiveInt = Annotated[int, Field(strict=False, ge=1), BeforeValidator(_number_only)]
NonNegativeInt = Annotated[int, Field(strict=False, ge=0), BeforeValidator(_number_only)]
LogprobCount = Annotated[int, Field(strict=False, ge=0, le=20), BeforeValidator(_number_only)]
ChoiceCount = Annotated[int, Field(strict=False, ge=1, le=64), BeforeValidator(_number_only)]


def _signed_64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


# Any integer; taken modulo 2**64 into the signed 64-bit range torch seeds with. No bounds on purpose: at ±2**63 a
# JSON number may arrive as a float a few units off, and a seed is fine either way.
Seed = Annotated[int, Field(strict=False), BeforeValidator(_number_only), AfterValidator(_signed_64)]

# Token ids and layer indices are non-negative; their upper bounds depend on the loaded model and are added to the
# published OpenAPI schema at runtime (``server.openapi``), where ``x-hpr-bound`` names the bound.
TokenId = Annotated[
    int, Field(strict=False, ge=0, json_schema_extra={"x-hpr-bound": "vocab"}), BeforeValidator(_number_only)
]
LayerIndex = Annotated[
    int, Field(strict=False, ge=0, json_schema_extra={"x-hpr-bound": "layers"}), BeforeValidator(_number_only)
]
NonEmptyStr = Annotated[str, Field(min_length=1)]
LAYER_SPEC_PATTERN = r"^\s*(selected|all|none|\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*)\s*$"
LayerSpec = Annotated[str, Field(pattern=LAYER_SPEC_PATTERN, json_schema_extra={"x-hpr-bound": "layer-spec"})]
TOKEN_ID_KEY_PATTERN = r"^(0|[1-9][0-9]*)$"
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 128  # prompts × n per completions request


def _check_bias_keys(bias: dict[str, float]) -> dict[str, float]:
    for key in bias:
        if re.fullmatch(TOKEN_ID_KEY_PATTERN, key) is None:
            raise ValueError(f"keys must be token ids (decimal integers), got {key!r}")
    return bias


# OpenAI sends token ids as JSON object keys (strings).
LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]],
    AfterValidator(_check_bias_keys),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": TOKEN_ID_KEY_PATTERN, "x-hpr-bound": "vocab"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "Token id (as a string) → bias in [-100, 100] added to its logit.",
        }
    ),
]
Stop = NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)]


# --- the `hpr` extension -----------------------------------------------------------------------------------------


class HPRRequest(RequestModel):
    """Per-request HPR edit (``extra_body={"hpr": {...}}`` in the OpenAI SDKs)."""

    adapter: NonEmptyStr | None = Field(
        default=None, description="Adapter id to edit with. Default: the adapter named by `model`, if it names one."
    )
    layers: LayerSpec | list[LayerIndex] = Field(
        default="selected",
        description="'selected' (the adapter's chosen layers), 'all' (every trained layer), 'none', "
        "a list of layer indices, or a string such as '10-14,20'.",
    )
    alpha: float | None = Field(
        default=None,
        ge=0,
        le=MAX_ALPHA,
        description="Edit strength in [0, 4]; 0 leaves activations unchanged. Default: the adapter's `default_alpha` "
        "(the strength its training evaluated; 1 for checkpoints that do not record one).",
    )
    scope: Literal["all", "generated"] | None = Field(
        default=None,
        description="'all' edits every position; 'generated' only the last prompt token and generated ones. "
        "Default: the adapter's `default_scope` ('all' for checkpoints that do not record one).",
    )
    edit_tokens: PositiveInt | Literal["all"] | None = Field(
        default=None,
        description="Edit only while the first N generated tokens are produced; the rest of the answer is generated "
        "from unedited states (the prompt's positions follow `scope` as before). 'all' edits every generated token. "
        "Default: the adapter's `default_edit_tokens` ('all' for checkpoints that do not record one).",
    )
    return_stats: bool = Field(default=False, description="Return per-layer edit statistics with each choice.")


class HPRLayerStats(OpenAIModel):
    tokens: int = Field(description="Token positions the edit looked at in this layer (scope applied).")
    rotated: int = Field(
        description="Of those, positions the edit changed (HPR: judged negative by the probe and rotated; a steering "
        "vector: every one)."
    )
    share_rotated: float = Field(description="rotated / tokens (0 when tokens is 0).")
    mean_angle: float = Field(
        description="Mean angle the changed positions were turned by, in radians (HPR: θ; steering: ∠(x, x'))."
    )


class HPRApplied(OpenAIModel):
    """The edit that was actually applied to every choice of the response."""

    adapter: str
    layers: list[int]
    alpha: float
    scope: Literal["all", "generated"]
    edit_tokens: int | Literal["all"] = Field(description="Generated tokens edited: a count, or 'all'.")


# --- shared --------------------------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
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
    root: str | None = Field(
        default=None, description="What the model or adapter was loaded from: a hub id, or a directory's name."
    )
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


# --- structured output and tool calls ------------------------------------------------------------------------------


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(RequestModel):
    type: Literal["json_object"]


class JSONSchemaFormat(RequestModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class FunctionDefinition(RequestModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: NonEmptyStr


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(OpenAIModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(OpenAIModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class RequestFunctionCall(RequestModel):
    name: NonEmptyStr
    arguments: str


class RequestToolCall(RequestModel):
    id: str
    type: Literal["function"]
    function: RequestFunctionCall


# --- chat completions ----------------------------------------------------------------------------------------------


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[RequestToolCall] | None = Field(default=None, description="An assistant turn's tool calls.")
    tool_call_id: str | None = Field(default=None, description="A tool turn: the call it answers.")


class ChatCompletionRequest(RequestModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: bool = False
    max_completion_tokens: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    n: ChoiceCount = 1
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted; a choice holds at most one tool call (docs/server.md)."
    )
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(default=1.0, ge=0)
    tool_choice: ToolChoice | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    top_logprobs: LogprobCount | None = Field(
        default=None, description="Alternatives per token; used with `logprobs: true`, ignored without."
    )
    top_p: float = Field(default=1.0, gt=0, le=1)
    user: str | None = None
    # extensions
    top_k: NonNegativeInt = Field(default=0, description="Sample from the k most likely tokens only (0 = off).")
    min_p: float = Field(
        default=0.0, ge=0, le=1, description="Drop tokens whose probability is below min_p × the top probability."
    )
    repetition_penalty: float = Field(
        default=1.0,
        ge=0.01,
        le=100,
        description="Multiplicative penalty on tokens already seen (1 = off), in [0.01, 100]: beyond, logits overflow.",
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token (benchmarks).")
    stop_token_ids: list[TokenId] | None = Field(
        default=None, description="Token ids that end generation, besides eos."
    )
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
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
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
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
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


class CompletionRequest(RequestModel):
    model: str | None = None
    prompt: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="A string, a list of strings, a list of token ids, or a list of such lists.")
    best_of: Annotated[int, Field(strict=False, ge=1, le=1), BeforeValidator(_number_only)] | None = Field(
        default=None, description="Only 1 (or null): no server-side best-of sampling."
    )
    echo: bool = False
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    logprobs: LogprobCount | None = None
    max_tokens: NonNegativeInt | None = 16
    n: ChoiceCount = 1
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: Annotated[str, Field(max_length=0)] | None = Field(
        default=None, description="Not supported: empty or null."
    )
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    user: str | None = None
    # extensions
    top_k: NonNegativeInt = Field(default=0, description="Sample from the k most likely tokens only (0 = off).")
    min_p: float = Field(
        default=0.0, ge=0, le=1, description="Drop tokens whose probability is below min_p × the top probability."
    )
    repetition_penalty: float = Field(
        default=1.0,
        ge=0.01,
        le=100,
        description="Multiplicative penalty on tokens already seen (1 = off), in [0.01, 100]: beyond, logits overflow.",
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token (benchmarks).")
    stop_token_ids: list[TokenId] | None = Field(
        default=None, description="Token ids that end generation, besides eos."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="Constrain the text to JSON (as on chat; vLLM's extension of completions)."
    )
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


# --- adapters at run time (POST /v1/adapters, DELETE /v1/adapters/{name}) -------------------------------------------

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class AdapterLoadRequest(RequestModel):
    name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        description="The adapter's id in the API (`model`, `hpr.adapter`): letters, digits, '.', '_', '-'.",
    )
    path: str = Field(
        min_length=1,
        description="Checkpoint directory (ours or the seed's), relative to --adapter-root or absolute; it must "
        "resolve inside --adapter-root.",
    )
    alpha: float | None = Field(
        default=None, ge=0, le=MAX_ALPHA, description="This name's default alpha (null: the checkpoint's)."
    )
    scope: Literal["all", "generated"] | None = Field(
        default=None, description="This name's default scope (null: the checkpoint's)."
    )
    edit_tokens: PositiveInt | Literal["all"] | None = Field(
        default=None, description="This name's default edited tokens, a count or 'all' (null: the checkpoint's)."
    )


class AdapterDeleted(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = Field(description="True: the adapter takes no new request from now on.")
    running_requests: int = Field(
        description="Requests still running on it; it leaves memory when they finish (0: it already has)."
    )
