"""Profile the verifier core on this machine and fit the latency estimator (`wisp calibrate`).

A grid of batch shapes — batch size × share of cold requests (a prompt prefill) × cached
length × draft length — each timed as one `VerifierCore.verify_batch` call, median of a few
repeats. Warm requests first get an untimed prefill round, so the timed round feeds only the
last committed token and its draft over a cached prompt, as a follow-up round does. Every
fourth grid point (seeded draw) is held out: the fit never sees it, and R², MAE and MAPE are
reported on those.
"""

from __future__ import annotations

import itertools
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.engine.estimator import BatchShape, FitReport, LatencyEstimator, fit, score
from common.engine.verifier import Verified, VerifierCore
from common.errors import WispError
from common.protocol import SessionSpec, VerifyRequest

__all__ = ["Calibration", "GRID", "QUICK_GRID", "calibrate", "hardware_name"]

# (batch sizes, cold shares, cached lengths, draft lengths)
GRID = ((1, 2, 4, 8, 16), (0.0, 0.5, 1.0), (32, 128, 384), (0, 4, 8))
QUICK_GRID = ((1, 4, 8), (0.0, 1.0), (32, 160), (0, 6))


def hardware_name(device: torch.device | str) -> str:
    """What an estimator is calibrated for: the GPU's name, or the CPU architecture with the
    number of torch threads (a CPU verifier's speed depends on both)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}-{torch.get_num_threads()}threads"
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name)


@dataclass(slots=True)
class Sample:
    batch: int
    cold: float
    cached: int
    draft: int
    shape: BatchShape
    ms: float


@dataclass(slots=True)
class Calibration:
    estimator: LatencyEstimator
    fit_report: FitReport  # on the fitted shapes
    heldout: FitReport  # on the held-out shapes
    samples: list[Sample]
    heldout_mask: list[bool]


class _Batches:
    def __init__(self, core: VerifierCore, seed: int):
        self.core = core
        self.rng = random.Random(seed)
        self.next_id = 0

    def _ids(self, n: int) -> list[int]:
        return [self.rng.randrange(1, self.core.runner.vocab_size) for _ in range(n)]

    def _open(self, prompt_len: int) -> tuple[str, list[int]]:
        sid = f"cal{self.next_id}"
        self.next_id += 1
        prompt = self._ids(prompt_len)
        self.core.open_session(SessionSpec(sid=sid, mode="sled", max_new_tokens=64, k_max=16),
                               prompt)
        return sid, prompt

    def _request(self, sid: str, rnd: int, base: int, k: int) -> VerifyRequest:
        return VerifyRequest(sid=sid, round=rnd, base_len=base, draft_ids=self._ids(k),
                             budget_ms=1e5, draft_ms=0.0, device_id="calibrate")

    def time_one(self, batch: int, cold: float, cached: int, draft: int) -> tuple[BatchShape, float]:
        n_cold = round(batch * cold)
        sessions, requests = [], []
        try:
            for i in range(batch):
                sid, prompt = self._open(cached)
                sessions.append(sid)
                if i < n_cold:
                    requests.append(self._request(sid, 0, len(prompt), draft))
                else:  # warm: an untimed prefill round first
                    self._check(self.core.verify_batch([self._request(sid, 0, len(prompt), 0)]))
                    requests.append(self._request(sid, 1, len(prompt) + 1, draft))
            start = time.perf_counter()
            done = self._check(self.core.verify_batch(requests))
            ms = (time.perf_counter() - start) * 1e3
        finally:
            for sid in sessions:
                self.core.close_session(sid)
        return BatchShape.of([(v.num_fed, v.num_cached) for v in done]), ms

    @staticmethod
    def _check(out: list[Verified | WispError]) -> list[Verified]:
        for v in out:
            if isinstance(v, WispError):
                raise v
        return out  # type: ignore[return-value]


def calibrate(core: VerifierCore, grid=GRID, repeats: int = 3, heldout_every: int = 4,
              seed: int = 0, progress: Callable[[str], None] | None = None) -> Calibration:
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    batches = _Batches(core, seed)
    # A model with a short context profiles the lengths it can take (prompt + draft + the
    # warm-up round's token must fit).
    room = core.runner.max_positions - 2
    points = [(b, cold, min(cached, room - draft), draft)
              for b, cold, cached, draft in itertools.product(*grid) if draft < room]
    batches.time_one(2, 0.5, min(32, room - 2), 2)  # warm-up: first calls pay one-time costs
    samples: list[Sample] = []
    skipped = 0
    started = time.perf_counter()
    for i, (b, cold, cached, draft) in enumerate(points):
        try:
            runs = [batches.time_one(b, cold, cached, draft) for _ in range(repeats)]
        except WispError:  # no KV room for a batch this big on this verifier: not profiled
            skipped += 1
            continue
        samples.append(Sample(b, cold, cached, draft, runs[0][0],
                              statistics.median(ms for _, ms in runs)))
        if (i + 1) % 10 == 0 or i + 1 == len(points):
            say(f"[calibrate] {i + 1}/{len(points)} shapes, "
                f"{time.perf_counter() - started:.0f}s"
                + (f" ({skipped} skipped: no KV room)" if skipped else ""))
    if len(samples) < 8:
        raise ValueError(f"only {len(samples)} of {len(points)} batch shapes could be profiled "
                         f"(context {core.runner.max_positions}, {skipped} without KV room): "
                         "too few to fit and judge the estimator")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = [False] * len(samples)
    for j in order[::heldout_every]:
        held[j] = True
    fit_s = [s for s, h in zip(samples, held, strict=True) if not h]
    held_s = [s for s, h in zip(samples, held, strict=True) if h]
    est = fit([s.shape for s in fit_s], [s.ms for s in fit_s])
    return Calibration(est, score(est, [s.shape for s in fit_s], [s.ms for s in fit_s]),
                       score(est, [s.shape for s in held_s], [s.ms for s in held_s]),
                       samples, held)
