"""Latency-estimator coefficients in Redis, per (model, hardware).

`wisp:estimator:{model}:{hardware}` is a hash (DESIGN.md §5): a, b_compute, b_read, c, r2,
mae_ms, fitted_at (unix s), source. A verifier loads its own at start (Redis first, then the
calibration file, then a quick profiling run of its own core) and writes what it found back, so
that replicas on the same hardware and the operator (`wisp calibrate --redis-url`) share one.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from common.engine.estimator import LatencyEstimator
from common.subjects import estimator_key

__all__ = ["load_estimator", "store_estimator"]

_COEFFICIENTS = ("a", "b_compute", "b_read", "c")


async def load_estimator(redis: aioredis.Redis, model: str,
                         hardware: str) -> LatencyEstimator | None:
    """The stored estimator, None when there is none; a ValueError when it is unreadable."""
    key = estimator_key(model, hardware)
    raw = await redis.hgetall(key)
    if not raw:
        return None
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    try:
        values = {name: float(fields[name]) for name in _COEFFICIENTS}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{key} is not an estimator: {type(exc).__name__}: {exc}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise ValueError(f"{key}: coefficients must be finite and >= 0: {values}")
    return LatencyEstimator(**values)


async def store_estimator(redis: aioredis.Redis, model: str, hardware: str,
                          est: LatencyEstimator, *, r2: float | None = None,
                          mae_ms: float | None = None, source: str = "calibrated") -> None:
    fields: dict[str, float | str] = {**est.as_dict(), "fitted_at": round(time.time(), 3),
                                      "source": source}
    if r2 is not None:
        fields["r2"] = r2
    if mae_ms is not None:
        fields["mae_ms"] = mae_ms
    await redis.hset(estimator_key(model, hardware), mapping=fields)
