"""Forward passes and token selection for the engine thread: prefill newcomers, decode a batch one step.

Everything here runs on the engine thread under ``torch.inference_mode()``. One host sync per step: the chosen
tokens (and the logprob tensors computed alongside them) are copied to the host once, after all tensor work.
Failures are contained: a forward or a token selection that raises is retried row by row, and only the rows
that fail again are failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hpr.editing import EditPlan, HPREditor
from server.engine.attention import AttentionLayout, Masks, convert_masks
from server.engine.batch import Batch, DecodePlan, EngineEvent, PrefillInputs, RequestState, mixed_edit_plan
from server.engine.compiled import CompiledDecoder
from server.engine.kv_cache import BatchKVCache
from server.engine.mixed import MixedCache, can_mix, mixed_attention_for
from server.engine.sampling import SamplingState
from server.engine.selection import row_event, select_tokens
from server.engine.types import MAX_GRAPHS

log = logging.getLogger(__name__)

PROMPT_LOGPROB_CHUNK = 256  # positions projected onto the vocabulary at a time when scoring a prompt


@dataclass
class StepOutcome:
    """What one prefill or decode produced: the batch to keep decoding, and the events to deliver."""

    batch: Batch | None
    events: list[tuple[RequestState, EngineEvent]]
    finished: list[RequestState]


@dataclass
class PrefillJob:
    """Newcomers being prefilled: ``columns`` columns of their left-padded prompts per forward, ``done`` so far.
    The engine runs one chunk per loop iteration, between decode steps of the running batch (chunked prefill)."""

    states: list[RequestState]
    inputs: PrefillInputs
    cache: BatchKVCache
    columns: int
    done: int = 0
    hidden: list[Tensor] = field(default_factory=list)  # the earlier chunks' last hidden states (prompt logprobs)
    budget: int | None = None  # prompt tokens the next forward may take (the engine's step budget); None: no limit

    def next_span(self) -> tuple[int, int]:
        """The columns [start, stop) of the next chunk: ``columns`` at most, and within ``budget`` tokens summed over
        the rows (at least one column, so a prefill always advances)."""
        columns = self.columns if self.budget is None else min(self.columns, max(1, self.budget // len(self.states)))
        return self.done, min(self.done + columns, self.inputs.columns)


class ModelRunner:
    """Runs the model for the engine. ``on_edit(layer, tokens)`` is called once per edited layer and forward."""

    def __init__(
        self,
        model: nn.Module,
        editor: HPREditor,
        pad_id: int,
        vocab_size: int,
        on_edit: Callable[[int, int], None] | None = None,
        compile_decode: bool = False,
        compile_max_graphs: int = MAX_GRAPHS,
        compile_autotune: bool = False,
    ) -> None:
        self.model = model
        self.editor = editor
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.num_layers = editor.num_layers
        self.device = next(model.parameters()).device
        self.on_edit = on_edit
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the engine needs attn_implementation 'sdpa' or 'eager', the model uses {impl!r}")
        self._additive_mask = impl == "eager"
        self.attention = AttentionLayout.of(model)  # full, windowed or alternating layers (server.engine.attention)
        self._dtype = next(model.parameters()).dtype
        self._decode_plan: DecodePlan | None = None  # the last decode step's, reused while the rows stay the same
        self.mixable = can_mix(model)  # decode steps and prefill chunks may share a forward
        # decode steps through one torch.compile'd graph (server.engine.compiled), or the eager forward
        self.compiled = (
            CompiledDecoder(model, editor.registry, self.num_layers, compile_max_graphs, autotune=compile_autotune)
            if compile_decode
            else None
        )

    # ---- forward passes -------------------------------------------------------------------------------------
    def _masks(self, mask: Tensor | None, ids: Tensor, cache: BatchKVCache) -> Masks:
        """The bool (N, 1, q, k) mask of ``ids`` (N, q) appended to ``cache``, as each layer's attention wants it:
        windowed where the layer is (:class:`AttentionLayout`), and additive for eager attention."""
        rows, queries = ids.shape
        masks = self.attention.masks(mask, queries, cache.length + queries, rows, ids.device)
        if not self._additive_mask:
            return masks
        return convert_masks(masks, self._additive)

    def _additive(self, mask: Tensor) -> Tensor:
        return torch.zeros(mask.shape, dtype=self._dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(self._dtype).min
        )

    def _forward(
        self, ids: Tensor, positions: Tensor, mask: Tensor | None, cache: BatchKVCache, plan: EditPlan | None
    ) -> Tensor:
        """Last-position logits (B, V) float32 for ``ids`` (B, T) appended to ``cache``."""
        with self.editor.apply(plan):
            out = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=self._masks(mask, ids, cache),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits: Tensor = out.logits[:, -1, :].float()
        return logits

    # ---- prefill --------------------------------------------------------------------------------------------
    def prefill(self, states: Sequence[RequestState]) -> StepOutcome:
        """Prefill ``states`` together; if that fails, one by one, failing only those that fail alone."""
        try:
            return self._prefill(states)
        except Exception as exc:
            if len(states) == 1:
                return self._fail_prefill(states[0], exc)
        return self._prefill_each(states)

    def _fail_prefill(self, state: RequestState, exc: Exception) -> StepOutcome:
        log.error("prefill failed for request %s", state.request_id, exc_info=exc)
        return StepOutcome(None, [(state, EngineEvent(error=exc))], [state])

    def _prefill_each(self, states: Sequence[RequestState]) -> StepOutcome:
        for state in states:  # the chunks that ran before the failure run again: count them once
            if state.stats is not None:
                state.stats.reset()
        outcomes = [self.prefill([s]) for s in states]
        batches = [o.batch for o in outcomes if o.batch is not None]
        return StepOutcome(
            Batch.concatenate(batches) if batches else None,
            [e for o in outcomes for e in o.events],
            [f for o in outcomes for f in o.finished],
        )

    def _prefill(self, states: Sequence[RequestState]) -> StepOutcome:
        job = self.start_prefill(states, None)
        outcome = self._prefill_chunk(job)
        assert outcome is not None  # one chunk: the whole prompt
        return outcome

    def start_prefill(self, states: Sequence[RequestState], chunk_tokens: int | None) -> PrefillJob:
        """A prefill of ``states`` (left-padded together) in forwards of at most ``chunk_tokens`` tokens summed over
        the rows (at least one column each); None: in one forward."""
        prompts = [s.request.prompt_ids for s in states]
        inputs = PrefillInputs.build(prompts, self.pad_id, self.device)
        columns = inputs.columns if not chunk_tokens else max(1, chunk_tokens // len(states))
        cache = BatchKVCache(self.num_layers, roomy=self.compiled is None)  # the compiled step wants exact buffers
        cache.plan(inputs.columns + max(s.max_new_tokens for s in states))  # on a CPU: no growth within the budgets
        return PrefillJob(list(states), inputs, cache, columns)

    def prefill_step(self, job: PrefillJob) -> StepOutcome | None:
        """The next chunk of ``job``: None while columns are left, the prefill's outcome (first tokens, the batch to
        decode) after the last. If a chunk fails, the requests are prefilled again whole, a failing one alone."""
        try:
            return self._prefill_chunk(job)
        except Exception as exc:
            if len(job.states) == 1:
                return self._fail_prefill(job.states[0], exc)
            log.warning("prefill of %d requests failed; prefilling them one by one", len(job.states), exc_info=exc)
        return self._prefill_each(job.states)

    def _prefill_chunk(self, job: PrefillJob) -> StepOutcome | None:
        states = job.states
        start, stop = job.next_span()
        ids, positions, mask = job.inputs.chunk(start, stop)
        plan = job.inputs.edit_plan(states, start, stop)
        want_prompt_logprobs = [s.request.sampling.prompt_logprobs for s in states]
        last = stop == job.inputs.columns
        if not last:  # no logits yet: the decoder alone, its hidden states kept only for prompt logprobs
            with self.editor.apply(plan):
                out = self._decoder()(
                    input_ids=ids, position_ids=positions, attention_mask=self._masks(mask, ids, job.cache),
                    cache=job.cache, use_cache=True,
                )  # fmt: skip
            if any(want_prompt_logprobs):
                job.hidden.append(out.last_hidden_state)
            if plan is not None:
                plan.flush_stats([s.stats for s in states])
            job.done = stop
            return None
        captured: dict[str, Tensor] = {}
        handle = None
        if any(want_prompt_logprobs):
            handle = self._decoder().register_forward_hook(_capture_last_hidden(captured))
        try:
            logits = self._forward(ids, positions, mask, job.cache, plan)  # (N, V)
        finally:
            if handle is not None:
                handle.remove()
        job.done = stop
        if plan is not None:
            plan.flush_stats([s.stats for s in states])
        self._report_prefill_edits(states)
        return self._prefill_done(job, logits, captured)

    def _prefill_done(self, job: PrefillJob, logits: Tensor, captured: dict[str, Tensor]) -> StepOutcome:
        """The prefill's last chunk ran (``logits`` (N, V) at each prompt's last token): first tokens, the batch."""
        states = job.states
        want_prompt_logprobs = [s.request.sampling.prompt_logprobs for s in states]
        sampling = SamplingState.build(
            [s.request.sampling for s in states],
            [s.generator for s in states],
            [s.request.prompt_ids for s in states],
            self.vocab_size,
            self.device,
            [s.matcher for s in states],
        )
        pad = job.inputs.pad
        batch = Batch(requests=list(states), cache=job.cache, pad=pad, next_tokens=pad, sampling=sampling)
        prompt_logprobs: dict[int, list[tuple[int, float, list[tuple[int, float]]] | None]] = {}
        if any(want_prompt_logprobs):
            hidden_all = torch.cat([*job.hidden, captured["hidden"]], dim=1)  # (N, T, h)
            for row, state in enumerate(states):
                if want_prompt_logprobs[row]:
                    hidden = hidden_all[row, int(pad[row]) :]  # (T_i, h)
                    prompt_logprobs[row] = self._prompt_logprobs(hidden, state)
        scoring_only = [s.max_new_tokens == 0 for s in states]
        return self._finish_step(batch, logits, prompt_logprobs, skip_rows=scoring_only)

    def _decoder(self) -> nn.Module:
        get_decoder = getattr(self.model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        if not isinstance(decoder, nn.Module):
            raise ValueError("prompt logprobs need a model with get_decoder()")
        return decoder

    def _prompt_logprobs(
        self, hidden: Tensor, state: RequestState
    ) -> list[tuple[int, float, list[tuple[int, float]]] | None]:
        """Log-probabilities of prompt tokens 1..T-1 given their prefix (raw model distribution), chunked."""
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        ids = torch.tensor(state.request.prompt_ids, dtype=torch.long, device=hidden.device)
        k = state.request.sampling.logprobs or 0
        result: list[tuple[int, float, list[tuple[int, float]]] | None] = [None]
        for start in range(0, hidden.shape[0] - 1, PROMPT_LOGPROB_CHUNK):
            stop = min(start + PROMPT_LOGPROB_CHUNK, hidden.shape[0] - 1)
            lp = torch.log_softmax(head(hidden[start:stop]).float(), dim=-1)  # (c, V)
            targets = ids[start + 1 : stop + 1]
            chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
            tops = torch.topk(lp, k, dim=-1) if k else None
            top_ids = tops.indices.tolist() if tops is not None else [[] for _ in chosen]
            top_lps = tops.values.tolist() if tops is not None else [[] for _ in chosen]
            for j, value in enumerate(chosen):
                result.append((int(targets[j]), value, list(zip(top_ids[j], top_lps[j], strict=True))))
        return result

    def _report_prefill_edits(self, states: Sequence[RequestState]) -> None:
        if self.on_edit is None:
            return
        per_layer: dict[int, int] = {}
        for state in states:
            spec = state.request.edit
            if spec is None or spec.is_noop:
                continue
            tokens = state.prompt_len - spec.first_edited_position(state.prompt_len)
            for layer in spec.layers:
                per_layer[layer] = per_layer.get(layer, 0) + tokens
        for layer, tokens in sorted(per_layer.items()):
            self.on_edit(layer, tokens)

    # ---- a decode step and a prefill chunk in one forward ---------------------------------------------------
    def can_mix(self, job: PrefillJob) -> bool:
        """Whether ``job``'s next chunk may share a forward with a decode step. Not with prompt logprobs: they need
        every prompt position's hidden state, which only the separate prefill keeps."""
        return self.mixable and not any(s.request.sampling.prompt_logprobs for s in job.states)

    def mixed_step(self, batch: Batch, job: PrefillJob) -> tuple[StepOutcome, StepOutcome | None]:
        """One decode step of ``batch`` and the next chunk of ``job`` in one forward (:mod:`server.engine.mixed`).

        Returns the decode step's outcome and, after the job's last chunk, the prefill's (else None). If the
        mixed forward fails, both caches are rolled back and the two run apart, each with its own failure handling.
        """
        length, done = batch.length, job.done
        try:
            decode_logits, prefill_logits = self._mixed_forward(batch, job)
        except Exception:
            log.warning(
                "mixed forward (%d decode rows, %d prompts) failed; running them apart", len(batch), len(job.states),
                exc_info=True,
            )  # fmt: skip
            batch.cache.rewind(length)
            job.cache.rewind(done)
            job.done = done
            prefilled = self.prefill_step(job)
            return self.decode(batch), prefilled
        decoded = self._finish_step(batch, decode_logits, {}, skip_rows=None)
        if prefill_logits is None:
            return decoded, None
        try:
            return decoded, self._prefill_done(job, prefill_logits, {})
        except Exception:  # as after a failed separate prefill: again, one by one, failing only those that fail
            log.warning("prefill of %d requests failed; prefilling them one by one", len(job.states), exc_info=True)
            return decoded, self._prefill_each(job.states)

    def _mixed_forward(self, batch: Batch, job: PrefillJob) -> tuple[Tensor, Tensor | None]:
        """Logits (B, V) of the decode rows and, after the last chunk, (N, V) at each prompt's last token."""
        start, stop = job.next_span()
        ids, positions, mask = job.inputs.chunk(start, stop)  # (N, c), (N, c), (N, 1, c, stop) or None
        n, c = ids.shape
        rows = len(batch)
        if mask is None:  # a whole prompt, nobody padded: plain causal
            mask = torch.ones(c, c, dtype=torch.bool, device=self.device).tril()[None, None].expand(n, 1, c, c)
        last = stop == job.inputs.columns
        flat_ids = torch.cat([batch.next_tokens, ids.reshape(-1)])[None]  # (1, B + N·c)
        flat_positions = torch.cat([batch.positions().reshape(-1), positions.reshape(-1)])[None]
        cache = MixedCache(batch.cache, job.cache, rows, (n, c), batch.attention_mask(), mask)
        plan = mixed_edit_plan(batch.requests, job.states, job.inputs, start, stop)
        keep = torch.arange(rows, device=self.device)  # the positions projected onto the vocabulary
        if last:
            keep = torch.cat([keep, rows + c * torch.arange(n, device=self.device) + c - 1])
        with self.editor.apply(plan), mixed_attention_for(self.model):
            out = self.model(
                input_ids=flat_ids, position_ids=flat_positions, cache=cache, use_cache=True, logits_to_keep=keep
            )
        logits: Tensor = out.logits[0].float()  # (len(keep), V)
        job.done = stop
        if plan is not None and plan.sums is not None:  # each chunk token's row adds to its prompt's counter
            sums, plan.sums = plan.sums, None
            for row, state in enumerate(batch.requests):
                if state.stats is not None:
                    state.stats.add(sums[row])
            per_prompt = sums[rows:].reshape(n, c, *sums.shape[1:]).sum(1)  # (N, layers, len(SUMS))
            for row, state in enumerate(job.states):
                if state.stats is not None:
                    state.stats.add(per_prompt[row])
        if self.on_edit is not None:
            for layer, count in self.decode_plan(batch).edited_rows.items():
                self.on_edit(layer, count)
        if last:
            self._report_prefill_edits(job.states)
        return logits[:rows], (logits[rows:] if last else None)

    # ---- decode ---------------------------------------------------------------------------------------------
    def decode(self, batch: Batch) -> StepOutcome:
        """One forward pass over every row of ``batch``, then one token per row."""
        try:
            logits = self._decode_forward(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("decode failed for request %s", batch.requests[0].request_id)
                return StepOutcome(None, [(batch.requests[0], EngineEvent(error=exc))], list(batch.requests))
            return self._decode_isolating(batch, exc)
        return self._finish_step(batch, logits, {}, skip_rows=None)

    def decode_plan(self, batch: Batch) -> DecodePlan:
        """The edit plan of ``batch``'s decode steps, rebuilt only when its rows change or a row reaches its
        ``edit_tokens`` limit."""
        if self._decode_plan is None or not self._decode_plan.fits(batch):
            self._decode_plan = DecodePlan.build(batch.requests)
        return self._decode_plan

    def _decode_forward(self, batch: Batch, keep_stats: bool = True) -> Tensor:
        """The decode forward of ``batch``; ``keep_stats=False`` for a trial run whose statistics must not count."""
        decode = self.decode_plan(batch)
        plan = decode.plan
        length = batch.length
        try:
            logits = None
            if self.compiled is not None:  # None: a graph it may not compile (compile_max_graphs reached)
                logits = self.compiled.forward(
                    batch.cache, batch.next_tokens[:, None], batch.positions(), batch.pad, plan
                )
            if logits is None:
                logits = self._forward(
                    batch.next_tokens[:, None], batch.positions(), batch.attention_mask(), batch.cache, plan
                )
        except Exception:
            batch.cache.rewind(length)  # undo a partial append: the step never happened
            if plan is not None:
                plan.sums = None  # nor did its statistics
            raise
        if plan is not None:
            if keep_stats:
                plan.flush_stats([s.stats for s in batch.requests])  # on the device: no sync
            else:
                plan.sums = None
            if self.on_edit is not None:
                for layer, rows in decode.edited_rows.items():
                    self.on_edit(layer, rows)
        return logits

    def _decode_isolating(self, batch: Batch, error: Exception) -> StepOutcome:
        """The batched forward failed: run each row alone (on a copy), fail those that fail, decode the rest."""
        events: list[tuple[RequestState, EngineEvent]] = []
        good: list[int] = []
        for row, state in enumerate(batch.requests):
            single = batch.filter([row])
            assert single is not None
            try:
                self._decode_forward(single, keep_stats=False)  # the row decodes for real with the rest below
                good.append(row)
            except Exception as exc:
                log.exception("decode failed for request %s", state.request_id)
                events.append((state, EngineEvent(error=exc)))
        if len(good) == len(batch):  # fails only together: nothing to blame on one row
            log.error("batched decode failed but every row succeeds alone: failing the batch: %r", error)
            return StepOutcome(None, [(s, EngineEvent(error=error)) for s in batch.requests], list(batch.requests))
        failed = [state for row, state in enumerate(batch.requests) if row not in good]
        rest = batch.filter(good)
        if rest is None:
            return StepOutcome(None, events, failed)
        outcome = self.decode(rest)
        return StepOutcome(outcome.batch, events + outcome.events, failed + outcome.finished)

    # ---- events -----------------------------------------------------------------------------------------------------
    def _finish_step(
        self,
        batch: Batch,
        logits: Tensor,
        prompt_logprobs: dict[int, list[tuple[int, float, list[tuple[int, float]]] | None]],
        skip_rows: list[bool] | None,
    ) -> StepOutcome:
        """Choose tokens, build each row's event, and filter out the rows that are done."""
        selection = select_tokens(logits, batch.sampling)
        events: list[tuple[RequestState, EngineEvent]] = []
        keep: list[int] = []
        finished: list[RequestState] = []
        for row, state in enumerate(batch.requests):
            try:
                event = row_event(row, state, selection, prompt_logprobs.get(row), skip_rows)
            except Exception as exc:
                log.exception("request %s failed", state.request_id)
                event = EngineEvent(error=exc)
            events.append((state, event))
            if event.finish_reason is not None or event.error is not None:
                finished.append(state)
            else:
                keep.append(row)
        batch.next_tokens = torch.tensor(selection.tokens, dtype=torch.long, device=self.device).clamp_min(0)
        return StepOutcome(batch.filter(keep, in_place=True), events, finished)  # `batch` is replaced by it


def _capture_last_hidden(store: dict[str, Tensor]) -> Callable[[nn.Module, Any, Any], None]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, tuple):
            hidden = output[0]
        if isinstance(hidden, Tensor):
            store["hidden"] = hidden

    return hook
