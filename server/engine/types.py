"""The engine ↔ HTTP contract: pure dataclasses and exception types (no FastAPI, no torch tensors).

An engine publishes one :class:`ModelInfo` (what the HTTP layer may know about the model). The HTTP layer
tokenizes (chat template included), builds one :class:`GenerationRequest` per choice (``n > 1`` is n requests;
with a seed, choice i uses seed + i), and consumes the :class:`GenerationOutput` events that ``generate`` yields.
Errors are :class:`EngineError` subclasses; the HTTP layer maps them to statuses. Edit statistics are
:class:`hpr.edit_stats.EditStats`, made in ``hpr`` and passed through as they are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from hpr.edit_spec import EditSpec
from hpr.edit_stats import EditStats
from hpr.model import LoadedModel

# Defaults shared by the engine and the server's settings (server/settings.py reads them from here).
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill forward (chunked prefill)
MAX_GRAPHS = 4  # compiled decode graphs at most (each holds a packed copy of the weights on a CPU)

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (as vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class ModelInfo:
    """The facts about the served model that the HTTP layer uses, decided once, by the engine that loaded it."""

    model_id: str  # the base model's id in the API
    source: str  # what it was loaded from: a hub id or a directory
    max_model_len: int  # prompt + generated tokens: the smaller of the requested length and the model's own
    vocab_size: int  # token ids are in [0, vocab_size)
    num_layers: int  # decoder layers (what `hpr.layers` may name)
    hidden_size: int
    tokenizer: Any  # a Hugging Face tokenizer with the chat template
    device: str = "unknown"  # where the model runs: "cpu", "cuda:0", ... (logged at startup)
    dtype: str = "unknown"  # the model's dtype, e.g. "torch.float32"

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, max_model_len: int | None = None) -> ModelInfo:
        """``max_model_len`` (None: the model's context) is capped at the model's context, with a warning."""
        context = loaded.max_context
        if max_model_len is not None and max_model_len > context:
            log.warning("--max-model-len %d exceeds the model's context %d: using %d", max_model_len, context, context)
        config = getattr(loaded.model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        return cls(
            model_id=loaded.model_id,
            source=loaded.source,
            max_model_len=min(max_model_len or context, context),
            vocab_size=int(vocab) if isinstance(vocab, int) and vocab > 0 else len(loaded.tokenizer),
            num_layers=loaded.num_layers,
            hidden_size=loaded.hidden_size,
            tokenizer=loaded.tokenizer,
            device=str(loaded.device),
            dtype=str(loaded.dtype),
        )


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field is out of range (→ 400). ``param`` names the field, e.g. ``"top_p"``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """The waiting queue is full (→ 429 with ``Retry-After: retry_after`` seconds)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context (→ 400, param ``messages``/``prompt``)."""


class EngineStoppedError(EngineError):
    """The engine is shutting down or stopped (→ 503)."""


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Validated on construction (raises :class:`InvalidRequestError`)."""

    max_tokens: int = 16  # 0 allowed only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 1.0  # below GREEDY_BELOW (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # per-request torch.Generator: the same text alone or in a batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> bias added to the logit
    stop: tuple[str, ...] = ()  # stop strings: they and what follows are not returned
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos token(s)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; k ≥ 0 = the chosen token's logprob + top-k alternatives
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (completions `echo` + `logprobs`)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 0, f"max_tokens must be ≥ 0, got {self.max_tokens}", "max_tokens")
        _check(
            self.max_tokens > 0 or self.prompt_logprobs,
            "max_tokens 0 is only allowed when scoring the prompt (echo + logprobs)",
            "max_tokens",
        )
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be ≥ 0, got {self.temperature}",
            "temperature",
        )
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check(self.top_k >= 0, f"top_k must be ≥ 0 (0 = off), got {self.top_k}", "top_k")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value}", name)
        _check(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            "repetition_penalty",
        )
        for token, bias in self.logit_bias.items():
            _check(
                isinstance(token, int) and math.isfinite(bias) and -100.0 <= bias <= 100.0,
                f"logit_bias must map token ids to numbers in [-100, 100], got {token!r}: {bias!r}",
                "logit_bias",
            )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings", "stop")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            f"logprobs must be in [0, 20], got {self.logprobs}",
            "logprobs",
        )

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that sampling is argmax anyway (vLLM's rule: below 1e-5). Below about
        1e-38 a float32 temperature is 0 and dividing by it gave NaN probabilities: a token drawn from nothing."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class OutputConstraint:
    """The generated text must be JSON: any object (``json_object``) or one matching ``schema`` (``json_schema``).

    Made by the serving layer (:mod:`server.serving.structured`), which checks the schema and makes its grammar, off
    the engine thread, before the request reaches an engine. ``grammar`` is an llguidance matcher at the grammar's
    start, which the hf engine copies for each request; the vllm backend hands ``grammar_schema`` (the schema with
    llguidance's options inside) to vLLM's guidance backend, which builds the same grammar. Output is compact JSON
    in both."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None  # the request's JSON Schema as JSON text (json_schema)
    grammar_schema: str | None = None  # what both backends build the grammar from (JSON text)
    grammar: Any = field(default=None, compare=False, repr=False)


@dataclass
class GenerationRequest:
    """One sequence to generate. ``prompt_ids`` are already tokenized (chat template applied)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    edit: EditSpec | None = None  # from AdapterRegistry.resolve(...); None = the base model
    return_stats: bool = False
    constraint: OutputConstraint | None = None  # None: free text


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float  # natural log, of the distribution after penalties/bias, before temperature/top-p/top-k
    top: list[tuple[int, str, float]]  # (token id, token text, logprob), best first


@dataclass
class GenerationOutput:
    """One event. A request yields ≥ 1 of them; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int]  # new tokens in this event
    text: str  # new text (incremental detokenization; stop strings and what follows removed)
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only, when asked (None for token 0)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    edit_stats: EditStats | None = None  # last event only, when return_stats
    cached_prompt_tokens: int | None = None  # prompt tokens served from a prefix cache (backends that have one)


class EngineObserver(Protocol):
    """Metrics hooks; called from the engine thread, so keep them cheap and thread-safe (prometheus is)."""

    def on_step(self, batch_size: int) -> None: ...
    def on_first_token(self, request_id: str, seconds: float) -> None: ...
    def on_token(self, request_id: str, seconds_since_last: float) -> None: ...
    def on_finish(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def on_edit(self, layer: int, tokens: int) -> None: ...


def check_request(request: GenerationRequest, info: ModelInfo) -> tuple[EditSpec | None, int]:
    """What every backend checks before it admits ``request``: token ids in the vocabulary, a prompt that leaves
    room in the context, edited layers the model has. Returns (the edit, None for none or a no-op; the room left
    for generated tokens); raises :class:`InvalidRequestError` / :class:`PromptTooLongError`."""
    prompt = request.prompt_ids
    vocab = info.vocab_size
    if not prompt:
        raise InvalidRequestError("the prompt is empty: it needs at least one token", "prompt")
    if any(not 0 <= t < vocab for t in prompt):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
    sampling = request.sampling
    for name, ids in (("logit_bias", list(sampling.logit_bias)), ("stop_token_ids", list(sampling.stop_token_ids))):
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", name)
    room = info.max_model_len - len(prompt)
    if room < 0 or (room == 0 and sampling.max_tokens > 0):
        raise PromptTooLongError(
            f"the prompt has {len(prompt)} tokens; the context holds {info.max_model_len} "
            f"(prompt + at least one generated token)",
            "prompt",
        )
    edit = request.edit if request.edit is not None and not request.edit.is_noop else None
    if edit is not None and any(not 0 <= layer < info.num_layers for layer in edit.layers):
        raise InvalidRequestError(f"layers {list(edit.layers)} out of range", "hpr.layers")
    return edit, room
