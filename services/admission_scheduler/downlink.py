"""Per-device downlink estimates for request deadlines (DESIGN.md §6).

The edge sends a budget (ms it can still wait) instead of a timestamp; the scheduler's deadline
is arrival + budget − the time the verdict needs to reach the device. That time is taken from
the device's own measured round trips: each VerifyRequest carries the edge's measured round trip
of its previous round (`prev_rtt_ms`); less the scheduler-side time of that round (arrival to
forward end) it is the network's share (uplink + downlink + the commit and reply after the
forward). The estimate is a high quantile of those, halved (links taken as symmetric: the edge
has already subtracted its own uplink estimate from the budget). A device not measured yet gets
the configured default. Pure Python; bounded: at most `max_devices` devices, least recently
seen dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from common.stats import percentile

__all__ = ["DownlinkEstimator"]


class DownlinkEstimator:
    def __init__(self, default_ms: float = 0.0, quantile: float = 0.9, *, window: int = 64,
                 min_samples: int = 3, max_devices: int = 10_000):
        self.default_ms = default_ms
        self.quantile = quantile
        self.window = window
        self.min_samples = min_samples
        self.max_devices = max_devices
        self._samples: OrderedDict[str, deque[float]] = OrderedDict()
        self._cache: dict[str, float] = {}  # device -> estimate, dropped when a sample arrives

    def observe(self, device: str, network_rtt_ms: float) -> None:
        samples = self._samples.get(device)
        if samples is None:
            samples = self._samples[device] = deque(maxlen=self.window)
            if len(self._samples) > self.max_devices:
                old, _ = self._samples.popitem(last=False)
                self._cache.pop(old, None)
        else:
            self._samples.move_to_end(device)
        samples.append(max(0.0, network_rtt_ms))
        self._cache.pop(device, None)

    def estimate(self, device: str) -> float:
        """ms to subtract from the device's budgets."""
        cached = self._cache.get(device)
        if cached is not None:
            return cached
        samples = self._samples.get(device)
        if samples is None or len(samples) < self.min_samples:
            return self.default_ms
        value = percentile(sorted(samples), 100 * self.quantile) / 2.0
        self._cache[device] = value
        return value

    def snapshot(self, limit: int = 20) -> dict[str, dict[str, float]]:
        """The most recently seen devices' estimates and sample counts (for /verifiers)."""
        devices = list(self._samples)[-limit:]
        return {d: {"downlink_ms": round(self.estimate(d), 3), "samples": len(self._samples[d])}
                for d in devices}

    def __len__(self) -> int:
        return len(self._samples)
