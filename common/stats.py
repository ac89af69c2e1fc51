"""Small statistics shared by the metrics service and the load generator's reports, so that a
percentile means the same in both."""

from __future__ import annotations

import math

__all__ = ["percentile"]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ascending ``sorted_values``, interpolating linearly
    between closest ranks (numpy's default); None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
