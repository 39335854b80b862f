"""Continuing a frozen prefix cache gives the same logits as running every full sequence from scratch."""

from __future__ import annotations

import torch

from trainer.prefix_cache import PrefixRunner, plan_batches


def test_batched_continuations_of_shared_prefixes_match_full_forwards(tiny_model) -> None:  # type: ignore[no-untyped-def]
    runner = PrefixRunner(tiny_model)
    shared, own = [5, 6, 7, 8], [9, 10, 11]
    answers = [[20, 21, 22, 23, 24], [30], [40, 41]]
    global_cache, _ = runner.extend(None, shared)
    q_cache, last = runner.extend(global_cache, own)
    out, valid = runner.continue_batch(q_cache, answers)
    with torch.no_grad():
        for i, ans in enumerate(answers):
            full = tiny_model(input_ids=torch.tensor([shared + own + ans])).logits[0]
            n = len(shared + own)
            assert last is not None and torch.allclose(last, full[n - 1], atol=1e-5)
            assert torch.allclose(out.logits[i, : len(ans)], full[n:], atol=1e-5)
            assert valid[i].sum() == len(ans)


def test_frozen_prefix_is_not_changed_by_continuations(tiny_model) -> None:  # type: ignore[no-untyped-def]
    runner = PrefixRunner(tiny_model)
    cache, _ = runner.extend(None, [3, 4, 5])
    before = [k.clone() for k, _ in cache.layers]
    runner.continue_batch(cache, [[6, 7], [8]])
    runner.extend(cache, [9])
    assert cache.length == 3
    assert all(torch.equal(a, k) for a, (k, _) in zip(before, cache.layers, strict=True))


def test_plan_batches_covers_every_row_once_and_respects_the_token_budget() -> None:
    lengths = [3, 40, 5, 41, 4, 39, 6]
    batches = plan_batches(lengths, max_tokens=90)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 90 or len(b) == 1 for b in batches)
    # short and long rows are not padded together when that wastes more than a forward pass costs
    assert any(set(b) == {0, 2, 4, 6} for b in batches)
