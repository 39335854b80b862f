"""bench/compare_servers.py: every scenario runs ≥ 2 ABBA rounds and each target is judged on its chosen metric."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare_servers as cs


def scenarios() -> dict[str, Any]:
    args = argparse.Namespace(
        quick=False, waves=1, max_tokens=64, tserve_max_tokens=32, seed_prompt_tokens=32, seed_max_tokens=16,
        batch1_max_tokens=64,
    )  # fmt: skip
    return {s.name: s for s in cs.build_scenarios(args, "dir", "base", list(range(30)), [14, 16, 17, 18, 19])}


def run(tok_s: float, tok_per_cpu_s: float) -> dict[str, Any]:
    return {"output_tok_per_s": tok_s, "tok_per_cpu_s": tok_per_cpu_s, "load_before": 1.0, "load_after": 1.0}


def test_metrics_are_fixed_per_target() -> None:
    metrics = {t.text: t.metric for s in scenarios().values() for t in s.targets}
    assert set(metrics.values()) <= {cs.TOK_S, cs.TOK_PER_CPU_S}
    by_scenario = {name: {t.metric for t in s.targets} for name, s in scenarios().items() if s.targets}
    assert by_scenario == {
        "tserve": {cs.TOK_S},  # two servers: what a client gets
        "seed": {cs.TOK_S},
        "edits": {cs.TOK_PER_CPU_S},  # one server against itself
        "mixed": {cs.TOK_PER_CPU_S},
    }


def test_a_target_is_met_only_on_its_metric() -> None:
    edits = scenarios()["edits"]
    labels = [c.label for c in edits.configs]  # no edit, top-5, all layers
    # top-5 looks free in tok/s (CPU share drifted up) but costs 5 % per CPU-second: not met
    runs = {labels[0]: [run(100, 50), run(100, 50)], labels[1]: [run(101, 47.5)] * 2, labels[2]: [run(90, 49)] * 2}
    result = cs.summarize(edits, runs)
    top5, every = result["targets"]
    assert top5["ratio"] == pytest.approx(1.01) and top5["cpu_ratio"] == pytest.approx(0.95) and not top5["met"]
    assert every["ratio"] == pytest.approx(0.90) and every["cpu_ratio"] == pytest.approx(0.98) and every["met"]


def test_fewer_than_two_rounds_is_refused() -> None:
    with pytest.raises(SystemExit) as info:
        cs.main(["--rounds", "1"])
    assert info.value.code == 2
