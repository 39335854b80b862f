"""The steering-vector method: the mean difference it fits, its direction's accuracy, and `hpr-train --method steer`
end to end (a checkpoint of method `steer` that loads, serves and evaluates like an HPR one)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpr.checkpoint import HPRAdapter, HPRConfig
from hpr.steering import SteeringVector
from tests.trainer.test_cli import run_args
from tests.trainer.test_fit import synthetic_pairs
from trainer.cli import main
from trainer.steer import fit_steering


def test_vector_is_the_mean_positive_minus_the_mean_negative_activation() -> None:
    train = synthetic_pairs(0)
    result = fit_steering(train, synthetic_pairs(1), batch_tokens=7)  # batches that split pairs: same sums
    pos = train.activations[train.pos_rows].double().mean(0)  # (L, h)
    neg = train.activations[train.neg_rows].double().mean(0)
    torch.testing.assert_close(result.vectors, (pos - neg).float(), atol=1e-5, rtol=1e-5)
    assert bool((result.vectors[:, 0] > 5).all())  # the synthetic data separates along +e0 by 6
    assert min(result.eval_accuracy.values()) > 0.9  # held-out pairs, classified by the vector's direction
    shuffled = synthetic_pairs(2)
    shuffled.activations[:, :, 0] = shuffled.activations[torch.randperm(shuffled.activations.shape[0]), :, 0]
    chance = fit_steering(train, shuffled).eval_accuracy
    assert max(chance.values()) < 0.75  # no signal in the held-out data: no accuracy


def test_to_adapter_puts_each_layers_vector_in_a_steer_checkpoint(tmp_path: Path) -> None:
    data = synthetic_pairs(0)
    result = fit_steering(data, data)
    config = HPRConfig(base_model="t", hidden_size=16, num_layers=3, layers=[0, 2], method="steer")
    result.to_adapter(config).save(tmp_path / "steer")
    loaded = HPRAdapter.load(tmp_path / "steer", hidden_size=16, num_layers=3)
    module = loaded.layer(2)
    assert isinstance(module, SteeringVector) and torch.equal(module.vector, result.vectors[2])


def test_run_with_method_steer_trains_selects_and_evaluates(tmp_path, tiny_model_dir, tiny_truthfulqa) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "steer"
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, "--method", "steer")) == 0
    adapter = HPRAdapter.load(out / "checkpoint", hidden_size=64, num_layers=4)
    config = adapter.config
    assert config.method == "steer" and config.layers == [0, 1, 2, 3] and len(config.selected_layers) == 2
    assert config.default_alpha == 1.0 and config.angle_widths == []
    ranked = sorted(config.probe_accuracy, key=lambda layer: (-config.probe_accuracy[layer], layer))
    assert config.selected_layers == sorted(ranked[:2])  # selected by the direction's eval accuracy
    fit_report = json.loads((out / "fit.json").read_text())
    assert fit_report["settings"]["method"] == "steer" and set(fit_report["vector_norm"]) == {"0", "1", "2", "3"}
    report = json.loads((out / "eval.json").read_text())
    assert report["edit"] == {"layers": config.selected_layers, "alpha": 1.0, "scope": "all", "edit_tokens": "all"}
    assert report["mc2"]["edited"] != report["mc2"]["base"]  # the vectors change the scores
    # The same directory trained as HPR: the steering checkpoint is not reused for another method.
    assert main(run_args(out, tiny_model_dir, tiny_truthfulqa, "--skip-eval")) == 0
    assert HPRAdapter.load(out / "checkpoint").config.method == "hpr"
