"""Tests that need shared data (TruthfulQA, the seed checkpoint) fail under CI=true when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import find_truthfulqa, require_shared_fixture


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_truthfulqa_fails_under_ci_and_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    assert find_truthfulqa(tmp_path) is None
    with pytest.raises(outcome, match="TruthfulQA not found"):
        require_shared_fixture(find_truthfulqa(tmp_path), "TruthfulQA")


def test_truthfulqa_is_found_where_it_is(tmp_path: Path) -> None:
    (tmp_path / "mc_task.json").write_text("[]")
    assert find_truthfulqa(tmp_path) == tmp_path
