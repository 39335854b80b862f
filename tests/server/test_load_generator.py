"""bench/load_generator.py against a live server (fake engine): it counts tokens and reports latencies."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.server.fake_engine import SCRIPT

SCRIPT_PATH = Path(__file__).resolve().parents[2] / "bench" / "load_generator.py"


@pytest.fixture(scope="module")
def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load_generator", SCRIPT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_reports_throughput_and_latency(
    load_generator: ModuleType, fake_server: Any, endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "summary.json"
    argv = ["--base-url", fake_server.api_base, "--model", "tiny", "--endpoint", endpoint, "--concurrency", "4",
            "--requests", "8", "--prompt-tokens", "10", "--max-tokens", "5", "--json", str(out),
            "--hpr-configs", '[{"alpha": 0.5}, {"layers": "all"}]', "--extra-body", '{"top_k": 3}']  # fmt: skip
    assert load_generator.main(argv) == 0
    report = capsys.readouterr().out
    assert "output tok/s" in report and "TTFT" in report and "inter-token" in report
    summary = json.loads(out.read_text())
    assert summary["failed"] == 0 and summary["requests"] == 8
    assert summary["output_tokens_mean"] == 5  # ignore_eos: the fake would otherwise stop after len(SCRIPT)
    assert summary["output_tok_per_s"] > 0 and not math.isnan(summary["ttft_ms_p95"])
    requests = fake_server.engine.requests[-8:]
    assert {r.edit.alpha for r in requests} == {0.5, 1.0}
    assert {r.sampling.top_k for r in requests} == {3}
    assert len(SCRIPT) > 5


def test_counts_failures(load_generator: ModuleType, fake_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--base-url", fake_server.api_base, "--model", "missing", "--concurrency", "2", "--max-tokens", "2",
            "--warmup", "0"]  # fmt: skip
    assert load_generator.main(argv) == 1
    assert "HTTP 404" in capsys.readouterr().out


def test_percentile(load_generator: ModuleType) -> None:
    assert load_generator.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert load_generator.percentile([5.0], 95) == 5.0
    assert math.isnan(load_generator.percentile([], 50))
