"""Integration: the embedded SmolLM2 loads from the cache, generates, and takes an HPR edit."""

from __future__ import annotations

import pytest
import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.editing import EditPlan, HPREditor
from hpr.errors import CheckpointError, ModelLoadError
from hpr.model import EMBEDDED_MODEL_ID, LoadedModel, load_model


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(EMBEDDED_MODEL_ID)


def test_embedded_model_loads_and_generates(smollm2: LoadedModel) -> None:
    assert smollm2.model_id == EMBEDDED_MODEL_ID
    assert (smollm2.num_layers, smollm2.hidden_size) == (30, 576)
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu"
    tok = smollm2.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = enc["input_ids"]
    out = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_edit_attaches_to_smollm2(smollm2: LoadedModel) -> None:
    torch.manual_seed(0)
    config = HPRConfig(
        base_model=EMBEDDED_MODEL_ID, hidden_size=576, num_layers=30, layers=[10, 12], selected_layers=[10, 12]
    )
    adapter = HPRAdapter(config)
    ids = smollm2.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = smollm2.model(input_ids=ids).logits
    editor = HPREditor(smollm2.model, {"a": adapter})
    try:
        spec = editor.resolve("a", "all", alpha=2.0)
        with torch.no_grad(), editor.apply(EditPlan([spec], collect_stats=True)) as plan:
            edited = smollm2.model(input_ids=ids).logits
        assert plan is not None
        stats = plan.row_stats(0).layers
        assert stats[10].tokens == ids.shape[1]
        assert torch.isfinite(edited).all()
        if stats[10].changed + stats[12].changed > 0:
            assert not torch.equal(edited, base)
    finally:
        editor.detach()
    with torch.no_grad():
        assert torch.equal(smollm2.model(input_ids=ids).logits, base)


def test_mismatched_adapter_is_refused(smollm2: LoadedModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_random_adapter

    make_random_adapter().save(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="tiny"):
        HPRAdapter.load(tmp_path / "tiny", hidden_size=smollm2.hidden_size, num_layers=smollm2.num_layers)


def test_bad_model_names_give_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="bad dtype"):
        load_model(EMBEDDED_MODEL_ID, dtype="float8")
