"""WISP's verification-time estimator (Mechanism 3): the time of one batched verify forward as

    T̂ = a·N_linear + b_compute·N_interactions + b_read·N_cached + c    (ms)

over a batch's shape: N_linear = Σ tokens fed (each goes through every linear layer),
N_interactions = Σ fed × (cached + fed) (attention query-key pairs), N_cached = Σ cached
tokens read. Fitted by least squares to profiled batches of the verifier's own hardware
(`common.engine.calibrate`), judged on shapes it was not fitted on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.stats import percentile

__all__ = ["BatchShape", "FitReport", "LatencyEstimator", "OnlineEstimator", "fit", "score"]


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

    def to_json(self, **meta: object) -> str:
        """The stored form (file and Redis): {"coefficients": {a, b_compute, b_read, c}, meta}."""
        return json.dumps({"coefficients": self.as_dict(), **meta}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> LatencyEstimator:
        """Parse the stored form; a ValueError says what is wrong with it."""
        try:
            data = json.loads(text)["coefficients"]
            values = {k: float(data[k]) for k in ("a", "b_compute", "b_read", "c")}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not an estimator: {type(exc).__name__}: {exc}") from None
        if not all(math.isfinite(v) and v >= 0 for v in values.values()):
            raise ValueError(f"estimator coefficients must be finite and >= 0: {values}")
        return cls(**values)

    def save(self, path: str | Path, **meta: object) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json(**meta))

    @classmethod
    def load(cls, path: str | Path) -> LatencyEstimator:
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


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


# Canonical batch shapes (batch size × tokens fed × tokens cached per request) at which the
# online refit is anchored to the scaled prior: directions the recent batches do not span
# (e.g. no cold prefill for a while) keep the calibrated behaviour instead of extrapolating.
_ANCHORS = tuple(BatchShape.of([(fed, cached)] * b)
                 for b in (1, 4, 16) for fed in (1, 9, 128) for cached in (0, 128, 1024))


class OnlineEstimator:
    """One verifier's estimator as the scheduler keeps it: calibrated coefficients (the prior,
    from the verifier's heartbeat) refined from the batch times the verifier reports.

    Every `refit_every` observations, once `min_refit` are in the window, the estimate is
    refitted: first `scale·prior + bias` by least squares on the window (two numbers, robust
    with few or similar batches), then a full non-negative fit over the window plus the
    canonical anchor shapes valued by that scaled prior (anchors weigh a quarter of the window),
    kept only when it predicts the window better. Both fits leave out the batches far off the
    first (more than 3 robust standard deviations: a batch that shared its device with
    something else); the first `warmup` batches (one-time costs) are not observed at all.
    Prediction errors (measured − predicted, of the estimate in force) feed the guard δ: a high
    quantile of the last `guard_window` of them, so that δ follows the current estimate.
    """

    def __init__(self, prior: LatencyEstimator, *, window: int = 256, refit_every: int = 16,
                 min_refit: int = 32, guard_quantile: float = 0.9, warmup: int = 3,
                 guard_window: int = 64):
        if not 0.0 < guard_quantile < 1.0:
            raise ValueError(f"guard_quantile must be within (0, 1), got {guard_quantile}")
        self.prior = self.current = prior
        self.window = window
        self.refit_every = refit_every
        self.min_refit = min_refit
        self.guard_quantile = guard_quantile
        self._shapes: list[BatchShape] = []
        self._times: list[float] = []
        self._errors: list[float] = []  # measured - predicted, ms
        self._guard: float | None = None  # guard_ms of the current _errors (None: stale)
        self._relative: list[float] = []  # |error| / measured
        self.warmup = warmup
        self.guard_window = guard_window
        self.num_seen = 0  # batches reported, warm-up included
        self.num_observed = 0
        self.num_refits = 0

    def predict(self, shape: BatchShape) -> float:
        return self.current.predict(shape)

    def observe(self, shape: BatchShape, measured_ms: float) -> float:
        """Record a measured batch; returns its prediction error (ms, + = slower than told)."""
        error = measured_ms - self.current.predict(shape)
        self.num_seen += 1
        if self.num_seen <= self.warmup:
            return error  # a process's first batches pay one-time costs: not the shape's
        for ring, value in ((self._shapes, shape), (self._times, measured_ms),
                            (self._errors, error),
                            (self._relative, abs(error) / max(measured_ms, 1e-6))):
            ring.append(value)
            if len(ring) > self.window:
                del ring[0]
        self._guard = None
        self.num_observed += 1
        if (self.num_observed % self.refit_every == 0
                and len(self._shapes) >= self.min_refit):
            self._refit()
        return error

    @property
    def guard_ms(self) -> float:
        """δ: the `guard_quantile` of recent under-predictions (0 before any batch)."""
        if not self._errors:
            return 0.0
        if self._guard is None:  # once per observed batch, not on every dispatch
            recent = self._errors[-self.guard_window:]
            # Pure Python: numpy's per-call overhead (tens of µs) is more than a short sort.
            self._guard = max(0.0, percentile(sorted(recent), 100 * self.guard_quantile))
        return self._guard

    def stats(self) -> dict[str, float]:
        """The running prediction error over the window (what the scheduler publishes)."""
        if not self._errors:
            return {"n": 0, "mae_ms": 0.0, "mape": 0.0, "bias_ms": 0.0, "guard_ms": 0.0}
        errors = np.asarray(self._errors)
        return {"n": len(errors), "mae_ms": float(np.mean(np.abs(errors))),
                "mape": float(np.mean(self._relative)), "bias_ms": float(np.mean(errors)),
                "guard_ms": self.guard_ms}

    def _refit(self) -> None:
        y = np.asarray(self._times)  # [n]
        p = np.asarray([self.prior.predict(s) for s in self._shapes])  # [n]
        # Robust: a batch that shared its CPU or GPU with something else (a one-time
        # initialisation, the OS scheduling another process in) is not what the shape costs.
        # Scale the prior by the median ratio (least squares would follow the outliers), drop
        # the batches off that by more than 3 robust standard deviations (MAD), and fit on the
        # rest.
        residual = y - float(np.median(y / np.maximum(p, 1e-9))) * p
        spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        keep = np.abs(residual - np.median(residual)) <= max(
            3.0 * spread, 0.05 * float(np.median(y)), 1e-3)
        shapes = [s for s, k in zip(self._shapes, keep, strict=True) if k]
        y, p = y[keep], p[keep]
        scale, bias = _scale_bias(p, y)
        scaled = LatencyEstimator(self.prior.a * scale, self.prior.b_compute * scale,
                                  self.prior.b_read * scale, max(0.0, self.prior.c * scale + bias))
        best, best_err = scaled, _sse(scaled, shapes, y)
        repeats = max(1, len(shapes) // (4 * len(_ANCHORS)))
        anchors = list(_ANCHORS) * repeats
        full = fit(shapes + anchors, list(y) + [scaled.predict(s) for s in anchors])
        full_err = _sse(full, shapes, y)
        if full_err < best_err:
            best = full
        self.current = best
        self.num_refits += 1


def _scale_bias(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y ≈ scale·p + bias by least squares, scale clamped to [0.2, 5] (a batch 5× off the
    calibration means the prior is for other hardware; keep the estimate sane meanwhile)."""
    if np.ptp(p) < 1e-9:
        return 1.0, float(np.mean(y - p))
    scale, bias = np.polyfit(p, y, 1)
    scale = float(np.clip(scale, 0.2, 5.0))
    return scale, float(np.mean(y - scale * p))


def _sse(est: LatencyEstimator, shapes: list[BatchShape], y: np.ndarray) -> float:
    return float(np.sum((np.asarray([est.predict(s) for s in shapes]) - y) ** 2))
