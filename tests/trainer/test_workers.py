"""Scoring split over worker processes gives exactly the single-process scores, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_random_adapter
from trainer.data import Question
from trainer.evaluate import ScoringJob, score_in_workers

QS = tuple(
    Question(
        i,
        f"Is {i} odd?",
        (f"{i} is what it is.",),
        (f"No {i}.", "Maybe."),
        mc1_correct=f"{i} is what it is.",
        mc1_incorrect=(f"No {i}.",),
    )
    for i in range(3)
)


@pytest.mark.slow
def test_two_workers_match_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    adapter = make_random_adapter()
    adapter.save(tmp_path / "ckpt")
    job = ScoringJob(str(tiny_model_dir), "cpu", "float32", str(tmp_path / "ckpt"), (0, 1), 1.0, QS)
    one = score_in_workers(job, 1)
    two = score_in_workers(job, 2)
    assert [s.index for s in two[0]] == [0, 1, 2]
    for single, split in zip(one, two, strict=True):  # each worker shares a different common prefix: ~1e-7 apart
        assert [s.index for s in split] == [s.index for s in single]
        assert [s.mc1 for s in split] == [s.mc1 for s in single]
        assert [s.mc2 for s in split] == pytest.approx([s.mc2 for s in single], rel=1e-4)
