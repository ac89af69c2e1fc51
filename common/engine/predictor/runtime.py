"""The rejection predictor as the edge runs it: an ONNX model in onnxruntime, checked before
use, timed per call, and held in a `PredictorSlot` that a service swaps between rounds.

A model is only installed after it loads, names this build's feature columns, and maps a probe
batch to probabilities; anything else (corrupt bytes, another format, other features) is
refused with a warning and the slot keeps its last good model (or none: its policy then drafts
a fixed k).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog

from common.engine.predictor.model import FORMAT
from common.protocol import DRAFT_FEATURES

__all__ = ["LatencyStats", "OnnxPredictor", "PredictorError", "PredictorSlot"]

log = structlog.get_logger(__name__)


class PredictorError(ValueError):
    """A model that cannot serve: corrupt, another format, other features."""


class LatencyStats:
    """Per-call latency of the predictor: count, total and the last `window` calls (µs)."""

    def __init__(self, window: int = 4096):
        self.calls = 0
        self.rows = 0
        self.total_us = 0.0
        self.recent: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, us: float, rows: int) -> None:
        with self._lock:
            self.calls += 1
            self.rows += rows
            self.total_us += us
            self.recent.append(us)

    def summary(self) -> dict[str, float]:
        with self._lock:
            recent = np.asarray(self.recent) if self.recent else np.zeros(1)
            return {"calls": self.calls, "rows": self.rows,
                    "mean_us": self.total_us / self.calls if self.calls else 0.0,
                    "p50_us": float(np.percentile(recent, 50)),
                    "p99_us": float(np.percentile(recent, 99))}


class OnnxPredictor:
    def __init__(self, data: bytes, source: str = "<bytes>"):
        import onnxruntime as ort

        self.source = source
        self.sha256 = hashlib.sha256(data).hexdigest()
        opts = ort.SessionOptions()
        # One thread: a call scores at most a few hundred rows, and the edge's draft forward
        # owns the cores; thread hand-offs would cost more than the matmuls.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several kinds
            raise PredictorError(f"{source}: not a loadable ONNX model ({exc})") from None
        meta = self._metadata()
        if meta.get("format") != FORMAT:
            raise PredictorError(f"{source}: format {meta.get('format')!r}, expected {FORMAT!r}")
        names = tuple(meta.get("feature_names") or ())
        if names != DRAFT_FEATURES:
            raise PredictorError(f"{source}: trained on features {list(names)}, this build "
                                 f"computes {list(DRAFT_FEATURES)}")
        threshold = meta.get("threshold")
        if not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
            raise PredictorError(f"{source}: threshold {threshold!r} is not in (0, 1]")
        self.threshold = float(threshold)
        self.version = str(meta.get("version") or self.sha256[:12])
        self.kind = str(meta.get("kind", "?"))
        self.metadata = meta
        self._input = self._session.get_inputs()[0].name
        self.latency = LatencyStats()
        probe = self.predict(np.zeros((3, len(DRAFT_FEATURES)), np.float32), timed=False)
        if probe.shape != (3,) or not np.all((probe >= 0) & (probe <= 1)):
            raise PredictorError(f"{source}: a probe batch gave {probe!r}, not 3 probabilities")

    @classmethod
    def load(cls, path: str | Path) -> OnnxPredictor:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PredictorError(f"{path}: {exc.strerror or exc}") from None
        return cls(data, str(path))

    def _metadata(self) -> dict:
        out = {}
        for key, value in self._session.get_modelmeta().custom_metadata_map.items():
            if key.startswith("wisp."):
                try:
                    out[key[5:]] = json.loads(value)
                except ValueError:
                    raise PredictorError(f"{self.source}: metadata {key} is not JSON") from None
        return out

    def predict(self, features: np.ndarray, timed: bool = True) -> np.ndarray:
        """features [B, F] float32 -> p_reject [B]."""
        start = time.perf_counter()
        (out,) = self._session.run(None, {self._input: np.ascontiguousarray(features,
                                                                             np.float32)})
        if timed:
            self.latency.add((time.perf_counter() - start) * 1e6, len(features))
        return out.reshape(-1)


class PredictorSlot:
    """The model in use; `install` swaps it only for a model that passed its checks."""

    def __init__(self, current: OnnxPredictor | None = None):
        self.current = current

    def install(self, data: bytes, source: str) -> bool:
        """True when the model at `source` now serves; False (with a warning) when it was
        refused and the last good one (or none) stays."""
        return self._take(lambda: OnnxPredictor(data, source), source)

    def install_file(self, path: str | Path) -> bool:
        return self._take(lambda: OnnxPredictor.load(path), str(path))

    def _take(self, make: Callable[[], OnnxPredictor], source: str) -> bool:
        try:
            model = make()
        except PredictorError as err:
            log.warning("predictor_refused", source=source, error=str(err),
                        keeps=self.current.version if self.current else "fixed-k")
            return False
        previous, self.current = self.current, model
        log.info("predictor_installed", version=model.version, source=source,
                 previous=previous.version if previous else None, threshold=model.threshold)
        return True

    @property
    def version(self) -> str | None:
        return self.current.version if self.current else None
