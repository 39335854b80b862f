"""Request → SamplingParams details that do not need a server."""

from __future__ import annotations

from server.engine.types import SamplingParams
from server.serving.sampling import for_choice


def test_choice_seeds_count_up_and_stay_64_bit() -> None:
    params = SamplingParams(seed=7)
    assert [for_choice(params, i).seed for i in range(3)] == [7, 8, 9]
    top = SamplingParams(seed=2**63 - 1)
    assert for_choice(top, 1).seed == -(2**63)
    assert for_choice(SamplingParams(), 3).seed is None
