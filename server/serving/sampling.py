"""OpenAI sampling fields → the engine's :class:`SamplingParams` (which validates ranges itself)."""

from __future__ import annotations

import dataclasses

from server.engine.types import SamplingParams
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    out: dict[int, float] = {}
    for key, bias in (raw or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias", code="invalid_value"
            ) from None
        if not 0 <= token < vocab_size:
            raise APIError(
                400, f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})", param="logit_bias",
                code="invalid_value",
            )  # fmt: skip
        out[token] = float(bias)
    return out


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop or ())  # count and emptiness: checked by the protocol


def _stop_token_ids(ids: list[int] | None, vocab_size: int) -> tuple[int, ...]:
    bad = [t for t in ids or () if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids {bad} are outside the vocabulary", param="stop_token_ids")
    return tuple(ids or ())


def sampling_params(
    request: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: bool,
    vocab_size: int,
) -> SamplingParams:
    """Build (and so validate) the sampling parameters shared by every choice of ``request``."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        stop=_stop(request.stop),
        stop_token_ids=_stop_token_ids(request.stop_token_ids, vocab_size),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def for_choice(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice ``i`` of a seeded request samples with ``seed + i``: reproducible, yet the choices differ."""
    if params.seed is None or choice == 0:
        return params
    seed = (params.seed + choice + 2**63) % 2**64 - 2**63  # stays a signed 64-bit seed
    return dataclasses.replace(params, seed=seed)
