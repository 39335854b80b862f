"""bench/percentiles.py, the benchmarks' one percentile helper, against numpy (an independent reference)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.percentiles import percentile


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 17, 100])
def test_both_methods_equal_numpys(n: int) -> None:
    rng = random.Random(n)
    values = [rng.random() for _ in range(n)]
    for q in (0, 5, 12.5, 37.5, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
        assert percentile(values, q, nearest=True) == float(np.percentile(values, q, method="nearest"))


def test_no_values_give_nan() -> None:
    assert math.isnan(percentile([], 50)) and math.isnan(percentile([], 50, nearest=True))
