"""A checkpoint written by the paper's own code (``../shared/fixtures/seed-checkpoint``) loads as the paper serves it.

The fixture is never copied into the repo: tests that need another form of it copy it to ``tmp_path`` and edit
the JSON there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hpr.checkpoint import SEED_CONFIG_NAME, SEED_PROBE_RESULTS_NAME, HPRAdapter
from hpr.editing import EditPlan, HPREditor
from hpr.errors import CheckpointError
from hpr.seed_format import save_seed_format
from tests.conftest import make_random_adapter, make_tiny_llama, require_shared_fixture

TRAINED = [1, 2, 4, 5]
SELECTED = [2, 4]
ACCURACY = {2: 0.78125, 4: 0.8125}
EDIT_RTOL = 1e-5


def copy_with_config(seed: Path, tmp_path: Path, **changes: Any) -> Path:
    """A copy of the fixture whose ``guidance_config.json`` has ``changes`` applied (``None`` removes a field)."""
    target = Path(shutil.copytree(seed, tmp_path / "seed"))
    target.chmod(0o755)  # the shared fixture is read-only, and copytree copies modes; the copy must be editable
    for file in target.iterdir():
        file.chmod(0o644)
    config = json.loads((target / SEED_CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / SEED_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return target


def relative_edit_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max over tokens of |ours − expected| / |expected| (vector norms over the hidden dim)."""
    diff = (ours.double() - expected).norm(dim=-1)  # (B, T)
    return float((diff / expected.norm(dim=-1)).max())


def test_seed_fixture_selected_layers_and_probe_accuracy(seed_checkpoint_dir: Path) -> None:
    adapter = HPRAdapter.load(seed_checkpoint_dir, hidden_size=64, num_layers=6)
    config = adapter.config
    assert config.layers == TRAINED
    assert config.selected_layers == SELECTED
    assert config.probe_accuracy == ACCURACY
    assert (config.hidden_size, config.num_layers, config.base_model) == (64, 6, "tiny-llama-h64-l6")
    assert config.training["source_format"] == "seed"


def test_seed_fixture_edits_match_reference(seed_checkpoint_dir: Path) -> None:
    adapter = HPRAdapter.load(seed_checkpoint_dir)
    expected = load_file(str(seed_checkpoint_dir / "expected_edits.safetensors"))
    x = expected.pop("x")  # (1, 7, 64) float32
    cases = {}
    for key in expected:
        m = re.fullmatch(r"layer(\d+)\.alpha([\d.]+)", key)
        assert m is not None, key
        cases[int(m.group(1)), float(m.group(2))] = expected[key]
    assert set(cases) == {(layer, alpha) for layer in TRAINED for alpha in (1.0, 1.5)}
    errors = {}
    for (layer, alpha), reference in cases.items():
        result = adapter.layer(layer).rotate(x, alpha)
        # The reference leaves positive tokens alone and rotates the others: the fixture holds both kinds.
        assert 0 < int(result.rotated.sum()) < x.shape[1], (layer, alpha)
        errors[layer, alpha] = relative_edit_error(result.output, reference)
    assert max(errors.values()) < EDIT_RTOL, errors


def test_seed_fixture_served_on_tiny_llama_edits_the_selected_layers(seed_checkpoint_dir: Path) -> None:
    model = make_tiny_llama(hidden=64, layers=6)
    adapter = HPRAdapter.load(seed_checkpoint_dir, "seed", hidden_size=64, num_layers=6)
    editor = HPREditor(model, {"seed": adapter})
    try:
        spec = editor.resolve("seed", "selected")
        assert spec.layers == tuple(SELECTED)
        assert editor.resolve("seed", None).layers == tuple(SELECTED)
        assert editor.resolve("seed", "all").layers == tuple(TRAINED)
        plan = EditPlan([spec], collect_stats=True)
        with torch.no_grad(), editor.apply(plan):
            model(torch.arange(3, 19).unsqueeze(0))  # (1, 16)
        assert plan.sums is not None
        seen = plan.sums[0, :, 0]  # (num_layers,) tokens looked at per layer, every layer
        assert [layer for layer in range(6) if seen[layer] > 0] == SELECTED
    finally:
        editor.detach()


def test_seed_fixture_on_a_model_of_another_depth_names_the_checkpoint(seed_checkpoint_dir: Path) -> None:
    # base_model_num_hidden_layers (6) is the checkpoint's word, not overridden by the caller's model.
    with pytest.raises(CheckpointError, match=re.escape(str(seed_checkpoint_dir)) + r".*num_layers=6.*num_layers=4"):
        HPRAdapter.load(seed_checkpoint_dir, hidden_size=64, num_layers=4)


@pytest.mark.parametrize(
    ("selected", "expected"),
    [
        (2, [2]),  # an int is one layer index, as the reference's prepare_modules_for_inference enables it
        (4, [4]),
        ("2,4", [2, 4]),
        ("4", [4]),
        ([4, 2], [2, 4]),
        ([2, 2, 4], [2, 4]),
        ([], []),  # the reference enables no module
        (None, TRAINED),  # no selection: every module, as in the reference
    ],
)
def test_each_form_of_selected_layers(
    seed_checkpoint_dir: Path, tmp_path: Path, selected: Any, expected: list[int]
) -> None:
    adapter = HPRAdapter.load(copy_with_config(seed_checkpoint_dir, tmp_path, selected_layers=selected))
    assert adapter.config.selected_layers == expected
    assert adapter.config.probe_accuracy == {}  # only the dict form carries accuracies


def test_probe_results_json_gives_every_layers_accuracy(seed_checkpoint_dir: Path, tmp_path: Path) -> None:
    results = {"1": 0.625, "2": 0.78125, "4": 0.8125, "5": 0.71875}  # as evaluate_probe.py's json.dump writes it
    for i, selected in enumerate(("2,4", {"2": 0.78125, "4": 0.8125})):
        ckpt = copy_with_config(seed_checkpoint_dir, tmp_path / str(i), selected_layers=selected)
        (ckpt / SEED_PROBE_RESULTS_NAME).write_text(json.dumps(results))
        config = HPRAdapter.load(ckpt).config
        assert config.selected_layers == SELECTED
        assert config.probe_accuracy == {1: 0.625, 2: 0.78125, 4: 0.8125, 5: 0.71875}


def test_legacy_selection_fields_still_load(seed_checkpoint_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_with_config(seed_checkpoint_dir, tmp_path, selected_layers=None, guidance_layers=[1, 5])
    assert HPRAdapter.load(ckpt).config.selected_layers == [1, 5]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selected_layers": 2.5}, r"selected_layers is 2\.5; expected an int"),
        ({"selected_layers": "all"}, r"selected_layers is 'all'; expected"),
        ({"selected_layers": "2;4"}, r"selected_layers is '2;4'; expected"),
        ({"selected_layers": True}, r"selected_layers is True; expected"),
        ({"selected_layers": ["2", "x"]}, r"selected_layers holds 'x', which is not a layer index"),
        ({"selected_layers": 6}, r"selected_layers names layer 6, out of range for a 6-layer base model"),
        ({"selected_layers": [2, -1]}, r"selected_layers names layer -1, out of range"),
        ({"selected_layers": "2,9"}, r"selected_layers names layer 9, out of range"),
        ({"selected_layers": {"2": "high"}}, r"selected_layers gives layer 2 the probe accuracy 'high', not a number"),
        ({"selected_layers": {"2": None}}, r"selected_layers gives layer 2 the probe accuracy None"),
        ({"selected_layers": {"2": 78.1}}, r"selected_layers gives layer 2 the probe accuracy 78\.1, not a number"),
        ({"selected_layers": {"two": 0.7}}, r"selected_layers holds 'two', which is not a layer index"),
        ({"selected_layers": "2,3"}, r"selected_layers names layer 3 with no module in guidance\.safetensors"),
        ({"selected_layers": [0, 3]}, r"selected_layers names layers \[0, 3\] with no module"),
        ({"selected_layers": None, "guided_layers": "3"}, r"guided_layers names layer 3 with no module"),
        ({"base_model_num_hidden_layers": "six"}, r"base_model_num_hidden_layers must be a positive integer"),
        ({"base_model_hidden_size": 128}, r"base_model_hidden_size is 128, the tensors have 64"),
        ({"base_model_name_or_path": 7}, r"base_model_name_or_path must be a string"),
        ({"target_layers": [1, 2, 4]}, r"target_layers is \[1, 2, 4\], but guidance\.safetensors has layers"),
    ],
)
def test_bad_seed_config_names_the_file_and_the_field(
    seed_checkpoint_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    ckpt = copy_with_config(seed_checkpoint_dir, tmp_path)
    config = json.loads((ckpt / SEED_CONFIG_NAME).read_text())
    config.update(changes)  # unlike copy_with_config, None is written as JSON null
    (ckpt / SEED_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / SEED_CONFIG_NAME)) + ": " + message):
        HPRAdapter.load(ckpt)


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"2": "0.7"}, r"the probe results gives layer 2 the probe accuracy '0\.7', not a number"),
        ({"3": 0.7}, r"the probe results names layer 3 with no module"),
        ([0.7, 0.8], r"config must be a JSON object"),
    ],
)
def test_bad_probe_results_name_the_file(seed_checkpoint_dir: Path, tmp_path: Path, results: Any, message: str) -> None:
    ckpt = copy_with_config(seed_checkpoint_dir, tmp_path)
    (ckpt / SEED_PROBE_RESULTS_NAME).write_text(json.dumps(results))
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / SEED_PROBE_RESULTS_NAME)) + ": " + message):
        HPRAdapter.load(ckpt)


def test_save_seed_format_writes_what_the_reference_writes(tmp_path: Path) -> None:
    adapter = make_random_adapter(trained=[0, 2, 3])  # selected [0, 2], accuracy for every trained layer
    path = save_seed_format(adapter, tmp_path / "seed")
    config = json.loads((path / SEED_CONFIG_NAME).read_text())
    assert config["selected_layers"] == {"0": 0.5, "2": 0.6}  # the {layer: accuracy} form of --top_k
    assert config["target_layers"] == [0, 2, 3]
    assert config["base_model_num_hidden_layers"] == 4
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert (config["guidance_hidden_size"], config["num_guidance_module_layers"]) == (None, 4)
    assert json.loads((path / SEED_PROBE_RESULTS_NAME).read_text()) == {"0": 0.5, "2": 0.6, "3": 0.7}
    loaded = HPRAdapter.load(path, hidden_size=64, num_layers=4)
    for field in ("base_model", "num_layers", "layers", "selected_layers", "probe_accuracy", "angle_widths"):
        assert getattr(loaded.config, field) == getattr(adapter.config, field), field
    assert torch.equal(loaded.layer(2).probe.weight, adapter.layer(2).probe.weight)


def test_save_seed_format_without_accuracies_writes_a_list(tmp_path: Path) -> None:
    adapter = make_random_adapter(trained=[1, 3])
    adapter.config.probe_accuracy = {}
    path = save_seed_format(adapter, tmp_path / "seed")
    assert json.loads((path / SEED_CONFIG_NAME).read_text())["selected_layers"] == [1, 3]
    assert not (path / SEED_PROBE_RESULTS_NAME).exists()
    assert HPRAdapter.load(path).config.selected_layers == [1, 3]


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_shared_fixture_fails_under_ci_and_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="seed checkpoint fixture not found"):
        require_shared_fixture(None, "seed checkpoint fixture")
