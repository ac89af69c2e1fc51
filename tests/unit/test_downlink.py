"""Per-device downlink estimates: a high quantile of measured network round trips, halved."""

from __future__ import annotations

import pytest

from services.admission_scheduler.downlink import DownlinkEstimator


def test_default_until_enough_samples_then_a_high_quantile_halved() -> None:
    est = DownlinkEstimator(default_ms=7.0, quantile=0.9)
    est.observe("phone", 40.0)
    est.observe("phone", 60.0)
    assert est.estimate("phone") == 7.0  # two samples are not enough
    for rtt in (50.0, 45.0, 55.0, 300.0, 42.0, 48.0, 52.0, 58.0):
        est.observe("phone", rtt)
    # The 90th percentile of the ten samples (between 60 and the 300 ms outlier), halved.
    assert est.estimate("phone") == pytest.approx(0.5 * (60 + 0.1 * (300 - 60)))
    assert est.estimate("wired") == 7.0  # devices are measured separately


def test_negative_network_time_counts_as_zero_and_the_window_slides() -> None:
    est = DownlinkEstimator(quantile=0.5, window=4)
    for rtt in (-5.0, -1.0, -3.0):  # clock noise: the round trip was shorter than the server
        est.observe("d", rtt)
    assert est.estimate("d") == 0.0
    for rtt in (20.0, 20.0, 20.0, 20.0):  # the old samples leave the window
        est.observe("d", rtt)
    assert est.estimate("d") == 10.0


def test_devices_are_bounded_least_recently_seen_first() -> None:
    est = DownlinkEstimator(default_ms=1.0, max_devices=2, min_samples=1)
    est.observe("a", 10.0)
    est.observe("b", 20.0)
    est.observe("a", 10.0)  # a is now the most recent
    est.observe("c", 30.0)
    assert len(est) == 2 and est.estimate("b") == 1.0 and est.estimate("a") == 5.0
    assert set(est.snapshot()) == {"a", "c"}
