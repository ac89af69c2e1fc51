"""WISP's verification-time estimator (Mechanism 3): the time of one batched verify forward as

    T̂ = a·N_linear + b_compute·N_interactions + b_read·N_cached + c    (ms)

over a batch's shape: N_linear = Σ tokens fed (each goes through every linear layer),
N_interactions = Σ fed × (cached + fed) (attention query-key pairs), N_cached = Σ cached
tokens read. Fitted by least squares to profiled batches of the verifier's own hardware
(`common.engine.calibrate`), judged on shapes it was not fitted on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["BatchShape", "FitReport", "LatencyEstimator", "fit", "score"]


@dataclass(slots=True, frozen=True)
class BatchShape:
    num_linear: int
    num_interactions: int
    num_cached: int

    @classmethod
    def of(cls, rows: list[tuple[int, int]]) -> BatchShape:
        """rows: (tokens fed, tokens cached) per request of the batch."""
        return cls(sum(f for f, _ in rows), sum(f * (c + f) for f, c in rows),
                   sum(c for _, c in rows))

    def vector(self) -> list[float]:
        return [float(self.num_linear), float(self.num_interactions), float(self.num_cached), 1.0]


@dataclass(slots=True, frozen=True)
class LatencyEstimator:
    a: float  # ms per fed token
    b_compute: float  # ms per attention interaction
    b_read: float  # ms per cached token read
    c: float  # ms per batch

    def predict(self, shape: BatchShape) -> float:
        return (self.a * shape.num_linear + self.b_compute * shape.num_interactions
                + self.b_read * shape.num_cached + self.c)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def save(self, path: str | Path, **meta: object) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"coefficients": self.as_dict(), **meta}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyEstimator:
        data = json.loads(Path(path).read_text())["coefficients"]
        return cls(**{k: float(data[k]) for k in ("a", "b_compute", "b_read", "c")})


def fit(shapes: list[BatchShape], times_ms: list[float]) -> LatencyEstimator:
    """Least squares with non-negative coefficients (a negative per-token cost would predict
    faster batches for bigger ones outside the profiled range): a non-negative least-squares
    over the four columns, scaled so that each column weighs the same."""
    if len(shapes) < 4:
        raise ValueError(f"need at least 4 profiled batches to fit 4 coefficients, got "
                         f"{len(shapes)}")
    x = np.asarray([s.vector() for s in shapes])  # [n, 4]
    y = np.asarray(times_ms, float)  # [n]
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    coef = _nnls(x / scale, y) / scale
    return LatencyEstimator(*(float(v) for v in coef))


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||x·w - y|| subject to w >= 0, by active set on 4 columns (x [n, d], y [n])."""
    d = x.shape[1]
    best, best_err = np.zeros(d), float(np.sum(y * y))
    for mask in range(1, 1 << d):  # 15 subsets of 4 columns: exhaustive is exact and cheap
        cols = [j for j in range(d) if mask >> j & 1]
        w, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if np.any(w < 0):
            continue
        full = np.zeros(d)
        full[cols] = w
        err = float(np.sum((x @ full - y) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


@dataclass(slots=True, frozen=True)
class FitReport:
    r2: float
    mae_ms: float
    mape: float  # a fraction
    n: int


def score(est: LatencyEstimator, shapes: list[BatchShape], times_ms: list[float]) -> FitReport:
    """How well `est` predicts measured times (use shapes it was not fitted on)."""
    y = np.asarray(times_ms, float)
    p = np.asarray([est.predict(s) for s in shapes])
    ss_res = float(np.sum((y - p) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1e-12
    return FitReport(r2=1.0 - ss_res / ss_tot, mae_ms=float(np.mean(np.abs(y - p))),
                     mape=float(np.mean(np.abs(y - p) / np.maximum(y, 1e-9))), n=len(y))
