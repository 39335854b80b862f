"""Batch.filter / Batch.concatenate over the left-padded KV cache (TGI's test names)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hpr.editing import HPREditor
from hpr.model import LoadedModel
from server.engine.batch import Batch, RequestState
from server.engine.runner import ModelRunner
from server.engine.sampling import new_generator
from server.engine.types import GenerationRequest, SamplingParams

MAX_NEW = 50


def make_states(loaded: LoadedModel, editor: HPREditor, texts: list[str]) -> list[RequestState]:
    loop = asyncio.new_event_loop()
    edits = [None, editor.resolve("tiny", "all"), editor.resolve("other", [2], alpha=1.5, scope="generated")]
    states = []
    for i, text in enumerate(texts):
        request = GenerationRequest(
            request_id=f"r{i}",
            prompt_ids=loaded.tokenizer.encode(text),
            sampling=SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
            edit=edits[i % len(edits)],
        )
        states.append(
            RequestState(
                request=request,
                loop=loop,
                queue=asyncio.Queue(),
                generator=new_generator(0),
                stop_ids=frozenset(),
                max_new_tokens=MAX_NEW,
            )
        )
    return states


def make_runner(loaded: LoadedModel, editor: HPREditor) -> ModelRunner:
    return ModelRunner(loaded.model, editor, pad_id=0, vocab_size=len(loaded.tokenizer))


def decode_logits(runner: ModelRunner, batch: Batch, steps: int) -> tuple[Batch, list[torch.Tensor]]:
    """Greedy-decode ``steps`` steps; returns the batch and each step's logits (B, V)."""
    seen: list[torch.Tensor] = []
    for _ in range(steps):
        logits = runner._decode_forward(batch)
        seen.append(logits)
        outcome = runner._finish_step(batch, logits, {}, skip_rows=None)
        assert outcome.batch is not None
        batch = outcome.batch
    return batch, seen


def prefill(runner: ModelRunner, states: list[RequestState]) -> Batch:
    outcome = runner.prefill(states)
    assert outcome.batch is not None and not outcome.finished
    return outcome.batch


@torch.inference_mode()
def test_batch_filter(tiny_loaded: LoadedModel, tiny_editor: HPREditor) -> None:
    """Removing rows (including the longest, whose padding then goes away) leaves the others' logits unchanged."""
    runner = make_runner(tiny_loaded, tiny_editor)
    texts = ["a much longer prompt than the others", "short", "mid length one"]
    full = prefill(runner, make_states(tiny_loaded, tiny_editor, texts))
    full, _ = decode_logits(runner, full, 2)
    length_before = full.length
    filtered = full.filter([1, 2])
    assert filtered is not None
    assert [s.request_id for s in filtered.requests] == ["r1", "r2"]
    assert filtered.length < length_before  # the padding only the longest row needed is gone
    assert int(filtered.pad.min()) == 0
    _, after_filter = decode_logits(runner, filtered, 3)
    _, unfiltered = decode_logits(runner, full, 3)
    for got, want in zip(after_filter, unfiltered, strict=True):
        torch.testing.assert_close(got, want[1:], atol=1e-5, rtol=1e-5)
    assert full.filter([]) is None


@torch.inference_mode()
@pytest.mark.parametrize("in_place", [True, False])
def test_batch_concatenate(tiny_loaded: LoadedModel, tiny_editor: HPREditor, in_place: bool) -> None:
    """A running batch and newly prefilled rows (shorter and longer caches) decode together as they would apart:
    written into the running cache's spare rows and head (in place), or copied into a new cache (when the running
    cache has no room)."""
    runner = make_runner(tiny_loaded, tiny_editor)
    texts_a = ["first running request", "second"]
    texts_b = ["a newcomer with a rather long prompt indeed", "new"]
    a_alone, a_ref = (prefill(runner, make_states(tiny_loaded, tiny_editor, texts_a)) for _ in range(2))
    (a_alone, _), (a_ref, _) = decode_logits(runner, a_alone, 2), decode_logits(runner, a_ref, 2)
    b_alone, b_ref = (prefill(runner, make_states(tiny_loaded, tiny_editor, texts_b)) for _ in range(2))
    assert b_alone.length > a_alone.length  # the newcomers' cache is longer: in place, it takes head columns
    if not in_place:
        a_alone.cache.exact_buffers()  # no spare rows, no head
    storage = a_alone.cache.growable_layers[0].keys.untyped_storage().data_ptr()  # type: ignore[union-attr]
    joined = Batch.concatenate([a_alone, b_alone])
    assert len(joined) == 4
    assert joined.length == max(a_alone.length, b_alone.length)
    keys = joined.cache.growable_layers[0].keys
    assert keys is not None and (keys.untyped_storage().data_ptr() == storage) == in_place
    _, together = decode_logits(runner, joined, 3)
    _, apart_a = decode_logits(runner, a_ref, 3)
    _, apart_b = decode_logits(runner, b_ref, 3)
    for got, want_a, want_b in zip(together, apart_a, apart_b, strict=True):
        torch.testing.assert_close(got, torch.cat([want_a, want_b]), atol=1e-5, rtol=1e-5)
