"""Per-row edit plans on a tiny llama: rows without edits are exact, detaching restores the model."""

from __future__ import annotations

import pytest
import torch

from hpr.checkpoint import HPRAdapter
from hpr.decoder_layers import capture_layer_outputs, find_decoder_layers
from hpr.editing import EditPlan, EditSpec, HPREditor, parse_layers
from hpr.errors import EditSpecError, UnknownAdapterError
from tests.conftest import make_random_adapter, make_tiny_llama


def logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_row_without_layers_equals_base_while_other_row_is_edited(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 128, (3, 9))
    base = logits(tiny_model, ids)
    editor = HPREditor(tiny_model, {"a": tiny_adapter})
    try:
        edit = EditSpec("a", (0, 1, 2, 3))
        plan = EditPlan([None, edit, EditSpec("a", ())])
        with editor.apply(plan):
            mixed = logits(tiny_model, ids)
        assert torch.equal(mixed[0], base[0])
        assert torch.equal(mixed[2], base[2])
        assert not torch.allclose(mixed[1], base[1])
        with editor.apply(EditPlan([edit])):
            alone = logits(tiny_model, ids[1:2])
        assert torch.allclose(alone[0], mixed[1], atol=1e-5)
    finally:
        editor.detach()
    assert torch.equal(logits(tiny_model, ids), base)


def test_different_alphas_and_layers_in_one_batch_match_alone(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 128, (4, 6))
    specs = [EditSpec("a", (1,), 0.5), EditSpec("a", (1, 3), 2.0), EditSpec("b", (0,), 1.0), None]
    other = make_random_adapter(seed=7)
    editor = HPREditor(tiny_model, {"a": tiny_adapter, "b": other})
    try:
        with editor.apply(EditPlan(specs)):
            batch = logits(tiny_model, ids)
        for i, spec in enumerate(specs):
            with editor.apply(EditPlan([spec])):
                alone = logits(tiny_model, ids[i : i + 1])
            assert torch.allclose(batch[i], alone[0], atol=1e-5)
    finally:
        editor.detach()


def test_scope_generated_edits_only_last_prompt_token_onwards(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 128, (1, 8))
    editor = HPREditor(tiny_model, {"a": tiny_adapter})
    layers = find_decoder_layers(tiny_model)
    try:
        with capture_layer_outputs(tiny_model, [0]) as cap:
            logits(tiny_model, ids)
            base0 = cap[0].clone()
            with editor.apply(EditPlan([EditSpec("a", (0,), scope="generated")], prompt_lengths=[6])):
                logits(tiny_model, ids)
            gen0 = cap[0].clone()
            with editor.apply(EditPlan([EditSpec("a", (0,), scope="all")])):
                logits(tiny_model, ids)
            all0 = cap[0].clone()
        assert len(layers) == 4
        # capture hook was registered after the editor's hook, so it sees the edited output
        assert torch.equal(gen0[0, :5], base0[0, :5])
        assert torch.allclose(gen0[0, 5:], all0[0, 5:], atol=1e-6)
        assert not torch.equal(all0[0, :5], base0[0, :5])
    finally:
        editor.detach()


def test_stats_count_tokens_and_rotations(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 128, (2, 5))
    editor = HPREditor(tiny_model, {"a": tiny_adapter})
    try:
        plan = EditPlan([EditSpec("a", (0, 2)), None], collect_stats=True)
        with editor.apply(plan):
            logits(tiny_model, ids)
        stats = plan.row_stats(0).layers
        assert list(stats) == [0, 2] and stats[0].tokens == 5 and stats[2].tokens == 5
        assert plan.sums is not None and plan.sums[0, 1].sum().item() == 0 and plan.sums[1].sum().item() == 0
        assert plan.row_stats(1).layers == {}
        assert 0 <= stats[0].changed <= 5
    finally:
        editor.detach()


def test_parse_layers(tiny_adapter: HPRAdapter) -> None:
    assert parse_layers("selected", tiny_adapter) == (0, 1)
    assert parse_layers("all", tiny_adapter) == (0, 1, 2, 3)
    assert parse_layers("none", tiny_adapter) == ()
    assert parse_layers("0-2,3", tiny_adapter) == (0, 1, 2, 3)
    assert parse_layers([3, 1], tiny_adapter) == (1, 3)
    for bad in ["1-", "x", "3-1", [True], [9], "7"]:
        with pytest.raises(EditSpecError) as info:
            parse_layers(bad, tiny_adapter)  # type: ignore[arg-type]
        assert info.value.param == "hpr.layers"


def test_bad_alpha_and_unknown_adapter(tiny_model, tiny_adapter: HPRAdapter) -> None:  # type: ignore[no-untyped-def]
    for alpha in [float("nan"), float("inf"), -0.1, 4.5]:
        with pytest.raises(EditSpecError) as info:
            EditSpec("a", (0,), alpha)
        assert info.value.param == "hpr.alpha"
    editor = HPREditor(tiny_model, {"a": tiny_adapter})
    try:
        with pytest.raises(UnknownAdapterError):
            editor.resolve("nope")
        assert editor.resolve("a", "all", 2.0).layers == (0, 1, 2, 3)
    finally:
        editor.detach()


def test_adapter_shape_mismatch_is_refused(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from hpr.errors import CheckpointError

    wrong = make_random_adapter(hidden=32)
    with pytest.raises(CheckpointError, match="hidden_size=32"):
        HPREditor(tiny_model, {"w": wrong})


def test_bf16_model_edits_stay_finite() -> None:
    model = make_tiny_llama().to(torch.bfloat16)
    editor = HPREditor(model, {"a": make_random_adapter()})
    try:
        with editor.apply(EditPlan([EditSpec("a", (0, 1, 2, 3), 4.0)])):
            out = logits(model, torch.randint(3, 128, (2, 7)))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    finally:
        editor.detach()


def test_resolve_without_alpha_takes_the_adapter_default(tiny_model) -> None:  # type: ignore[no-untyped-def]
    adapter = make_random_adapter()
    adapter.config.default_alpha = 2.0
    editor = HPREditor(tiny_model, {"a": adapter})
    try:
        assert editor.resolve("a").alpha == 2.0
        assert editor.resolve("a", alpha=0.5).alpha == 0.5
    finally:
        editor.detach()


def test_resolve_without_scope_takes_the_adapter_default(tiny_model) -> None:  # type: ignore[no-untyped-def]
    adapter = make_random_adapter()
    adapter.config.default_scope = "generated"
    editor = HPREditor(tiny_model, {"a": adapter})
    try:
        assert editor.resolve("a").scope == "generated"
        assert editor.resolve("a", scope="all").scope == "all"
    finally:
        editor.detach()
