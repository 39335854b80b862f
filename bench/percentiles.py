"""The one percentile helper of the benchmarks (what each figure in docs/benchmarks.md was computed with)."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float, nearest: bool = False) -> float:
    """The ``q``-th percentile (q in [0, 100]) of ``values``; NaN for none. Linear interpolation between the two
    closest ranks (numpy's default), or with ``nearest`` the closest rank itself (numpy's ``method="nearest"``:
    the value of an actual sample, rounding half to even as numpy does)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    if nearest:
        return ordered[round(rank)]
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
