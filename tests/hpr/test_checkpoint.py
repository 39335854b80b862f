"""Checkpoint round trips (ours and the seed's layout) and clear errors on bad directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpr.checkpoint import CONFIG_NAME, WEIGHTS_NAME, HPRAdapter
from hpr.errors import CheckpointError
from hpr.seed_format import save_seed_format
from tests.conftest import make_random_adapter, make_steering_adapter


def same_weights(a: HPRAdapter, b: HPRAdapter) -> bool:
    sa, sb = a.state_tensors(), b.state_tensors()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(tmp_path: Path) -> None:
    adapter = make_random_adapter(trained=[1, 3])
    adapter.save(tmp_path / "ckpt")
    loaded = HPRAdapter.load(tmp_path / "ckpt", hidden_size=64, num_layers=4)
    assert same_weights(adapter, loaded)
    assert loaded.config == adapter.config
    text = (tmp_path / "ckpt" / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["format_version"] == 2 and data["method"] == "hpr"
    assert all(k.startswith("layers.") for k in loaded.state_tensors())


def test_seed_layout_loads(tmp_path: Path) -> None:
    adapter = make_random_adapter(trained=[0, 2])
    save_seed_format(adapter, tmp_path / "seed")
    loaded = HPRAdapter.load(tmp_path / "seed", hidden_size=64, num_layers=4)
    assert same_weights(adapter, loaded)
    assert loaded.config.layers == [0, 2]
    assert loaded.config.selected_layers == [0, 2]


def test_mismatch_names_the_file(tmp_path: Path) -> None:
    make_random_adapter().save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt.*hidden_size=64"):
        HPRAdapter.load(tmp_path / "ckpt", hidden_size=576, num_layers=30)


@pytest.mark.parametrize("damage", ["no_dir", "bad_json", "no_weights", "corrupt_weights", "wrong_keys"])
def test_bad_directories_give_clear_errors(tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    make_random_adapter().save(ckpt)
    if damage == "no_dir":
        ckpt = tmp_path / "missing"
    elif damage == "bad_json":
        (ckpt / CONFIG_NAME).write_text("{not json")
    elif damage == "no_weights":
        (ckpt / WEIGHTS_NAME).unlink()
    elif damage == "corrupt_weights":
        (ckpt / WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    elif damage == "wrong_keys":
        make_random_adapter(trained=[0]).save(tmp_path / "other")
        (ckpt / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match=str(ckpt.name)):
        HPRAdapter.load(ckpt)


def test_saved_files_are_readable_by_other_users(tmp_path: Path) -> None:
    # A checkpoint written by one user (the trainer, often root) is read by another (the non-root server image).
    path = make_random_adapter().save(tmp_path / "a")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (path / name).stat().st_mode & 0o044 == 0o044, name


def test_default_alpha_round_trips_and_is_validated(tmp_path: Path) -> None:
    adapter = make_random_adapter()
    adapter.config.default_alpha = 2.0
    adapter.save(tmp_path / "ckpt")
    assert HPRAdapter.load(tmp_path / "ckpt").config.default_alpha == 2.0
    data = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    data["default_alpha"] = 9.0
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="default_alpha"):
        HPRAdapter.load(tmp_path / "ckpt")


def test_default_scope_round_trips_and_is_validated(tmp_path: Path) -> None:
    adapter = make_random_adapter()
    assert adapter.config.default_scope == "all"  # checkpoints that do not record one keep the old behaviour
    adapter.config.default_scope = "generated"
    adapter.save(tmp_path / "ckpt")
    assert HPRAdapter.load(tmp_path / "ckpt").config.default_scope == "generated"
    data = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    data["default_scope"] = "prompt"
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"hpr_config\.json.*default_scope"):
        HPRAdapter.load(tmp_path / "ckpt")


@pytest.mark.parametrize("bad", [0, -3, "4", True, 1.5])
def test_default_edit_tokens_round_trips_and_is_validated(tmp_path: Path, bad: object) -> None:
    adapter = make_random_adapter()
    assert adapter.config.default_edit_tokens is None  # checkpoints that do not record one edit every token
    adapter.config.default_edit_tokens = 4
    adapter.save(tmp_path / "ckpt")
    assert HPRAdapter.load(tmp_path / "ckpt").config.default_edit_tokens == 4
    data = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    data["default_edit_tokens"] = bad
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"hpr_config\.json.*default_edit_tokens"):
        HPRAdapter.load(tmp_path / "ckpt")


def test_a_version_1_checkpoint_without_method_loads_as_hpr(tmp_path: Path) -> None:
    """Every checkpoint written before methods existed: format_version 1, no `method` field."""
    adapter = make_random_adapter(trained=[1, 2])
    adapter.save(tmp_path / "v1")
    data = json.loads((tmp_path / "v1" / CONFIG_NAME).read_text())
    del data["method"]
    data["format_version"] = 1
    (tmp_path / "v1" / CONFIG_NAME).write_text(json.dumps(data))
    loaded = HPRAdapter.load(tmp_path / "v1", hidden_size=64, num_layers=4)
    assert loaded.config.method == "hpr" and same_weights(adapter, loaded)
    loaded.save(tmp_path / "again")  # written back in the current format
    again = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert again["format_version"] == 2 and again["method"] == "hpr"


def test_steering_checkpoint_round_trips(tmp_path: Path) -> None:
    adapter = make_steering_adapter(trained=[0, 3])
    adapter.save(tmp_path / "steer")
    loaded = HPRAdapter.load(tmp_path / "steer", hidden_size=64, num_layers=4)
    assert loaded.config.method == "steer" and loaded.config.angle_widths == []
    assert sorted(loaded.state_tensors()) == ["layers.0.vector", "layers.3.vector"]
    assert same_weights(adapter, loaded)
    with pytest.raises(CheckpointError, match="steer"):
        save_seed_format(loaded, tmp_path / "seed")  # the seed's layout holds HPR modules only


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "lora", r"hpr_config\.json.*unknown edit method 'lora'"),
        ("format_version", 3, r"hpr_config\.json.*format_version 3 is newer"),
        ("angle_widths", [64, 32], r"hpr_config\.json.*'steer' has no angle MLP"),
    ],
)
def test_bad_method_fields_are_refused_naming_the_file(tmp_path: Path, field: str, value: object, message: str) -> None:
    make_steering_adapter().save(tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    data[field] = value
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        HPRAdapter.load(tmp_path / "ckpt")
