"""Token selection after a forward, and each row's event: one host copy per step for every row's token and logprobs.

If choosing the tokens of the whole batch fails, each row is chosen alone, so only a bad row fails.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.batch import EngineEvent, RequestState
from server.engine.grammar import accept_tokens, grammar_ended, mask_logits
from server.engine.sampling import SamplingState, process_logits, sample
from server.engine.types import FinishReason

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The tokens chosen for a batch, on the host."""

    tokens: list[int]  # (B,) chosen token per row (-1 where the row failed)
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]]  # row -> (chosen logprob, top alternatives)
    failed: dict[int, BaseException]


def _select(logits: Tensor, sampling: SamplingState, want: list[int]) -> tuple[Tensor, Tensor | None]:
    if any(m is not None for m in sampling.matchers):
        logits = logits.contiguous()
        mask_logits(logits, sampling.matchers)  # only what each constrained row's grammar allows next
    processed = process_logits(logits, sampling)  # (B, V)
    tokens = sample(processed, sampling)  # (B,)
    logprobs = None
    if want:
        logprobs = torch.log_softmax(processed.index_select(0, torch.tensor(want, device=logits.device)), dim=-1)
    return tokens, logprobs


def select_tokens(logits: Tensor, sampling: SamplingState) -> Selection:
    """Tokens (and logprobs) for every row; on failure, row by row so a bad row fails alone."""
    want = [i for i, p in enumerate(sampling.params) if p.logprobs is not None]
    try:
        tokens, logprobs = _select(logits, sampling, want)
        sampling.record(tokens)
        return _accepted(_to_host(tokens, logprobs, want, sampling, {}), sampling)
    except Exception:
        log.warning("batched token selection failed; retrying row by row", exc_info=True)
    failed: dict[int, BaseException] = {}
    token_list: list[Tensor] = []
    rows_lp: list[Tensor] = []
    for row in range(logits.shape[0]):
        single = sampling.filter(torch.tensor([row], device=logits.device), [row])
        try:
            tok, lp = _select(logits[row : row + 1], single, [0] if row in want else [])
            token_list.append(tok)
            if lp is not None:
                rows_lp.append(lp)
        except Exception as exc:
            log.exception("token selection failed for row %d", row)
            failed[row] = exc
            token_list.append(torch.full((1,), -1, dtype=torch.long, device=logits.device))
    tokens = torch.cat(token_list)
    ok_want = [i for i in want if i not in failed]
    logprobs = torch.cat(rows_lp) if rows_lp else None
    sampling.record(tokens.clamp_min(0))
    return _accepted(_to_host(tokens, logprobs, ok_want, sampling, failed), sampling)


def _accepted(selection: Selection, sampling: SamplingState) -> Selection:
    """The chosen tokens fed to the constrained rows' grammars; a row whose grammar refuses its token fails."""
    if any(m is not None for m in sampling.matchers):
        for row, exc in accept_tokens(sampling.matchers, selection.tokens).items():
            selection.failed.setdefault(row, exc)
    return selection


def _to_host(
    tokens: Tensor,
    logprobs: Tensor | None,
    want: list[int],
    sampling: SamplingState,
    failed: dict[int, BaseException],
) -> Selection:
    result: dict[int, tuple[float, list[tuple[int, float]]]] = {}
    if logprobs is not None and want:
        index = torch.tensor(want, device=tokens.device)
        chosen = logprobs.gather(1, tokens.index_select(0, index).clamp_min(0)[:, None]).squeeze(1)  # (n,)
        k_max = max(sampling.params[i].logprobs or 0 for i in want)
        top = torch.topk(logprobs, k_max, dim=-1) if k_max else None
        chosen_list = chosen.tolist()
        top_ids = top.indices.tolist() if top is not None else None
        top_values = top.values.tolist() if top is not None else None
        for j, row in enumerate(want):
            k = sampling.params[row].logprobs or 0
            alternatives = list(zip(top_ids[j][:k], top_values[j][:k], strict=True)) if top_ids and top_values else []
            # a token the row's grammar forbids has logprob -inf: impossible, so not an alternative (nor JSON)
            alternatives = [(t, v) for t, v in alternatives if v != -math.inf]
            result[row] = (chosen_list[j], alternatives)
    return Selection(tokens=tokens.tolist(), logprobs=result, failed=failed)


def row_event(
    row: int,
    state: RequestState,
    selection: Selection,
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]] | None] | None,
    skip_rows: list[bool] | None,
) -> EngineEvent:
    if row in selection.failed:
        return EngineEvent(error=selection.failed[row])
    event = EngineEvent(prompt_logprobs=prompt_logprobs)
    finish: FinishReason | None = None
    if skip_rows is not None and skip_rows[row]:
        finish = "length"  # max_tokens 0: the prompt was scored, nothing is generated
    else:
        token = selection.tokens[row]
        state.generated.append(token)
        event.token_ids = [token]
        if row in selection.logprobs:
            value, top = selection.logprobs[row]
            event.logprobs = [(token, value, top)]
        if token in state.stop_ids or grammar_ended(state.matcher):
            finish = "stop"
        elif len(state.generated) >= state.max_new_tokens:
            finish = "length"
    if finish is not None:
        event.finish_reason = finish
        event.edit_stats = state.edit_stats()
    return event
