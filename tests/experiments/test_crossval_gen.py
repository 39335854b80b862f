"""experiments/crossval_gen.py: sweep configurations, the random-probe null control, and stale fold answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import crossval_gen as cv
import quality_report as qr

from hpr.checkpoint import HPRAdapter
from hpr.householder import HPRLayer
from tests.conftest import make_random_adapter, make_steering_adapter


def test_a_sweep_config_names_the_fold_adapter() -> None:
    assert cv.sweep_spec("a05t2=alpha=0.5:tokens=2") == "a05t2=fold:alpha=0.5:tokens=2"


@pytest.mark.parametrize(
    ("text", "says"),
    [("alpha=0.5", "expected NAME=FIELDS"), ("a-b=alpha=1", "expected NAME=FIELDS"), ("x=alpha=zz", "not a number")],
)
def test_a_bad_sweep_config_is_a_clear_error(text: str, says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        cv.sweep_spec(text)


def probes(adapter: HPRAdapter) -> dict[int, torch.Tensor]:
    out = {}
    for layer in adapter.layers:
        module = adapter.layer(layer)
        assert isinstance(module, HPRLayer)
        out[layer] = module.probe.weight.detach()[0].clone()
    return out


def test_the_null_control_keeps_norms_and_angle_mlps_and_draws_new_directions(tmp_path: Path) -> None:
    trained = make_random_adapter(hidden=64, layers=4)
    trained.save(tmp_path / "trained")
    a = HPRAdapter.load(cv.random_probe_copy(tmp_path / "trained", tmp_path / "r1", 1))
    again = HPRAdapter.load(cv.random_probe_copy(tmp_path / "trained", tmp_path / "r1b", 1))
    other = HPRAdapter.load(cv.random_probe_copy(tmp_path / "trained", tmp_path / "r2", 2))
    w, wa, w_again, w_other = probes(trained), probes(a), probes(again), probes(other)
    for layer in trained.layers:
        assert torch.allclose(wa[layer].norm(), w[layer].norm(), rtol=1e-5)
        cosine = float(torch.dot(wa[layer], w[layer]) / (wa[layer].norm() * w[layer].norm()))
        assert abs(cosine) < 0.6  # 64 dims: a random direction, not the trained one (whose cosine is 1)
        assert torch.equal(wa[layer], w_again[layer])  # seeded
        assert not torch.equal(wa[layer], w_other[layer])
        for p, q in zip(trained.layer(layer).angle.parameters(), a.layer(layer).angle.parameters(), strict=True):
            assert torch.equal(p, q)
    assert "random" in a.config.training["null_control"]
    # Layers draw different directions (one shared stream per layer would not be independent either).
    assert not torch.allclose(wa[0] / wa[0].norm(), wa[1] / wa[1].norm())


def test_the_null_control_needs_an_hpr_adapter(tmp_path: Path) -> None:
    make_steering_adapter().save(tmp_path / "steer")
    with pytest.raises(SystemExit, match="not an HPR adapter"):
        cv.random_probe_copy(tmp_path / "steer", tmp_path / "out", 1)


def write_fold(fold: Path, alpha: float, scope: str, tokens: int | str) -> None:
    fold.mkdir(parents=True, exist_ok=True)
    applied = {"adapter": "fold0", "alpha": alpha, "scope": scope, "edit_tokens": tokens, "layers": [1, 2]}
    (fold / "eval_gen.json").write_text(json.dumps({"configs": {"served": {"applied": applied}}}))


def test_stale_fold_answers_are_judged_again(tmp_path: Path) -> None:
    settings = {"FORMAT": "qa", "ALPHA": "0.5", "SCOPE": "generated", "EDIT_TOKENS": "2"}
    assert not cv.served_run_matches(tmp_path / "none", settings)
    write_fold(tmp_path / "f", 0.5, "generated", 2)
    assert cv.served_run_matches(tmp_path / "f", settings)
    write_fold(tmp_path / "f", 0.5, "generated", 4)  # the Makefile's default moved from 4 tokens to 2
    assert not cv.served_run_matches(tmp_path / "f", settings)
    write_fold(tmp_path / "f", 0.25, "generated", 2)
    assert not cv.served_run_matches(tmp_path / "f", settings)
    write_fold(tmp_path / "f", 0.5, "generated", "all")
    assert cv.served_run_matches(tmp_path / "f", {**settings, "EDIT_TOKENS": "all"})


def test_pooled_configs_keep_each_folds_layers_and_the_report_shows_them() -> None:
    def applied(layers: list[int]) -> dict[str, object]:
        return {"adapter": "fold", "alpha": 0.5, "scope": "generated", "edit_tokens": 1, "layers": layers}

    folds = [
        {"base": {"applied": None}, "x": {"applied": applied([16, 18, 19])}},
        {"base": {"applied": None}, "x": {"applied": applied([13, 15, 19])}},
    ]
    pooled = cv.pooled_configs(["base", "x"], folds)
    assert pooled["base"] == {"applied": None}
    assert pooled["x"]["applied"]["layers"] == [[16, 18, 19], [13, 15, 19]]
    text = qr._edit({"configs": pooled}, "x")
    assert text == "fold: layers 16,18,19 / 13,15,19, α 0.5, scope generated, first 1 token"
