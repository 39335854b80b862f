"""Which token of vLLM's packed step gets which edit: the plan, checked against positions worked out by hand."""

from __future__ import annotations

import torch

from hpr.edit_spec import EditSpec
from server.vllm_backend.token_plan import RequestEdit, build_token_plan


def plan_of(edits: list[RequestEdit | None], prompts: list[int], counts: list[int], starts: list[int]):  # type: ignore[no-untyped-def]
    positions = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts, strict=True)])
    ids = [f"r{i}" for i in range(len(edits))]
    return build_token_plan(edits, ids, prompts, counts, positions, num_layers=4, device=torch.device("cpu"))


def test_no_edit_no_plan() -> None:
    assert plan_of([None, None], [3, 4], [3, 1], [0, 7]) is None


def test_tokens_follow_each_requests_scope_and_limit_by_position() -> None:
    # r0: a prefill chunk of positions 4-9 of a 10-token prompt, scope generated: only position 9 (the last prompt
    # token). r1: a decode step at position 12 of a 10-token prompt with edit_tokens 2: generated token k is fed at
    # position 8 + k, so position 12 (k = 4) is past the limit. r2: a decode step at position 10, limit 2: edited.
    # r3: unedited. r4: scope all over a 3-token prefill.
    gen = RequestEdit(EditSpec("a", (1,), alpha=0.5, scope="generated"), "r0", stats=True)
    limited = RequestEdit(EditSpec("a", (1, 2), alpha=1.0, scope="generated", tokens=2), "r1")
    everywhere = RequestEdit(EditSpec("b", (2,), alpha=2.0, scope="all"), "r4", stats=True)
    plan = plan_of([gen, limited, limited, None, everywhere], [10, 10, 10, 5, 3], [6, 1, 1, 1, 3], [4, 12, 10, 5, 0])
    assert plan is not None and plan.num_tokens == 12
    # packed token index: r0 → 0-5, r1 → 6, r2 → 7, r3 → 8, r4 → 9-11
    layer1 = {(g.adapter, tuple(g.tokens.tolist()), tuple(g.alpha.tolist())) for g in plan.groups[1]}
    assert layer1 == {("a", (5,), (0.5,)), ("a", (7,), (1.0,))}
    layer2 = {(g.adapter, tuple(g.tokens.tolist())) for g in plan.groups[2]}
    assert layer2 == {("a", (7,)), ("b", (9, 10, 11))}
    assert set(plan.groups) == {1, 2}
    assert plan.stat_ids == ["r0", "r4"]  # only the requests that asked
    rows = {
        tuple(g.tokens.tolist()): None if g.rows is None else g.rows.tolist()
        for g in [*plan.groups[1], *plan.groups[2]]
    }
    assert rows == {(5,): [0], (7,): None, (9, 10, 11): [1, 1, 1]}  # statistics rows of r0 and r4 only
    assert plan.sums is not None and plan.sums.shape == (2, 4, 3)


def test_extra_args_round_trip_and_a_noop_edit_is_none() -> None:
    edit = RequestEdit(EditSpec("k#1", (0, 3), alpha=1.5, scope="generated", tokens=4), "req-1", stats=True)
    assert RequestEdit.from_extra_args(edit.to_extra_args()) == edit
    assert RequestEdit.from_extra_args(None) is None
    assert RequestEdit.from_extra_args({"other": 1}) is None
    assert RequestEdit.from_extra_args(RequestEdit(EditSpec("k", (), alpha=1.0), "r").to_extra_args()) is None


def test_a_group_of_every_token_of_the_step_is_marked_so_the_op_skips_the_gather() -> None:
    spec = EditSpec("a", (0,), alpha=1.0, scope="all")
    both = [RequestEdit(spec, "r0"), RequestEdit(spec, "r1")]
    whole = plan_of(both, [3, 2], [3, 2], [0, 0])
    assert whole is not None and [g.every_token for g in whole.groups[0]] == [True]
    assert whole.groups[0][0].tokens.tolist() == [0, 1, 2, 3, 4]
    part = plan_of([both[0], None], [3, 2], [3, 2], [0, 0])
    assert part is not None and [g.every_token for g in part.groups[0]] == [False]
