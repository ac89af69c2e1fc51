"""The verification-time estimator: the shape features, the non-negative least-squares fit,
held-out scoring, the coefficients file, and a calibration run on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.engine.calibrate import calibrate
from common.engine.estimator import BatchShape, LatencyEstimator, OnlineEstimator, fit, score
from common.engine.verifier import VerifierCore
from common.models.paged_runner import PagedRunner
from services.cli import main
from tests.unit.tiny_random_models import tiny_llama


def test_batch_shape_counts_linear_interaction_and_cached_work() -> None:
    # A cold prefill of 10 (+2 drafts) and a warm round feeding 3 over 40 cached tokens.
    shape = BatchShape.of([(12, 0), (3, 40)])
    assert shape == BatchShape(num_linear=15, num_interactions=12 * 12 + 3 * 43, num_cached=40)


def test_fit_recovers_the_coefficients_and_scores_held_out_shapes() -> None:
    rng = np.random.default_rng(0)
    truth = LatencyEstimator(a=0.05, b_compute=2e-5, b_read=0.004, c=3.0)
    shapes = [BatchShape(int(rng.integers(1, 400)), int(rng.integers(0, 200_000)),
                         int(rng.integers(0, 5000))) for _ in range(60)]
    times = [truth.predict(s) * (1 + rng.normal(0, 0.01)) for s in shapes]
    est = fit(shapes[:45], times[:45])
    for name in ("a", "b_compute", "b_read", "c"):
        assert getattr(est, name) == pytest.approx(getattr(truth, name), rel=0.15)
    held = score(est, shapes[45:], times[45:])
    assert held.r2 > 0.99 and held.mape < 0.05 and held.n == 15


def test_fit_keeps_every_coefficient_non_negative() -> None:
    # Times that fall with the cached tokens would give b_read < 0 unconstrained.
    shapes = [BatchShape(10, 100, cached) for cached in (0, 100, 200, 300, 400)]
    est = fit(shapes, [10.0, 9.0, 8.0, 7.0, 6.0])
    assert min(est.a, est.b_compute, est.b_read, est.c) >= 0.0
    with pytest.raises(ValueError, match="at least 4"):
        fit(shapes[:3], [1.0, 2.0, 3.0])


def test_coefficients_round_trip_through_their_file(tmp_path) -> None:
    est = LatencyEstimator(0.1, 1e-5, 0.002, 4.0)
    est.save(tmp_path / "e.json", model="m", hardware="h")
    assert LatencyEstimator.load(tmp_path / "e.json") == est
    assert json.loads((tmp_path / "e.json").read_text())["hardware"] == "h"


def test_calibration_fits_on_some_shapes_and_reports_on_the_others() -> None:
    core = VerifierCore(PagedRunner(tiny_llama(seed=1), num_blocks=512, block_size=4), None)
    grid = ((1, 4), (0.0, 1.0), (8, 40), (0, 3))
    cal = calibrate(core, grid, repeats=1, heldout_every=4, seed=0, progress=lambda _: None)
    assert len(cal.samples) == 16 and sum(cal.heldout_mask) == 4
    assert cal.fit_report.n == 12 and cal.heldout.n == 4
    # Cold requests fed their prompt; warm ones one token plus the draft over a cached prompt.
    warm = next(s for s in cal.samples if s.cold == 0.0 and s.batch == 4 and s.cached == 40
                and s.draft == 3)
    assert warm.shape == BatchShape.of([(4, 40)] * 4)
    cold = next(s for s in cal.samples if s.cold == 1.0 and s.batch == 1 and s.cached == 8
                and s.draft == 0)
    assert cold.shape == BatchShape.of([(8, 0)])
    assert all(s.ms > 0 for s in cal.samples) and not core.sessions  # all closed


def test_wisp_calibrate_json_reports_the_held_out_fit(capsys, tmp_path) -> None:
    assert main(["calibrate", "--quick", "--repeats", "1", "--json",
                 "--out", str(tmp_path / "est.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("r2", "mape", "mae_ms", "n_fit", "n_heldout", "coefficients"):
        assert key in out, key
    assert out["n_fit"] == 18 and out["n_heldout"] == 6 and out["mape"] >= 0
    assert LatencyEstimator.load(tmp_path / "est.json").as_dict() == out["coefficients"]


# -- online refinement ------------------------------------------------------------------------
def _random_shape(rng: np.random.Generator) -> BatchShape:
    rows = [(int(rng.choice([1, 9, 200])), int(rng.choice([0, 100, 600])))
            for _ in range(int(rng.integers(1, 17)))]
    return BatchShape.of(rows)


def test_online_estimator_learns_the_hardware_it_measures() -> None:
    """Calibrated on other hardware (half as fast per token, a third of the overhead), it
    converges to what the batches measure; the guard tracks recent under-predictions."""
    rng = np.random.default_rng(1)
    truth = LatencyEstimator(a=0.05, b_compute=1e-5, b_read=2e-4, c=3.0)
    online = OnlineEstimator(LatencyEstimator(a=0.1, b_compute=1e-5, b_read=1e-4, c=1.0))
    first_errors = [online.observe(s, truth.predict(s)) for s in
                    (_random_shape(rng) for _ in range(16))]
    assert online.num_refits == 0 and online.current == online.prior  # too few to refit
    for _ in range(300):
        s = _random_shape(rng)
        online.observe(s, truth.predict(s) * rng.uniform(0.97, 1.03))
    held = [_random_shape(rng) for _ in range(50)]
    report = score(online.current, held, [truth.predict(s) for s in held])
    assert report.mape < 0.05 and online.num_refits > 0
    assert max(abs(e) for e in first_errors) > 5 * online.stats()["mae_ms"]
    assert 0 < online.guard_ms < 0.1 * np.mean([truth.predict(s) for s in held])


def test_online_estimator_keeps_the_calibration_where_batches_do_not_reach() -> None:
    """Only warm batches of one shape family for a while: the refit must not extrapolate
    wildly to a cold prefill (anchored at the scaled prior)."""
    prior = LatencyEstimator(a=0.05, b_compute=1e-5, b_read=2e-4, c=3.0)
    online = OnlineEstimator(prior)
    for i in range(200):
        s = BatchShape.of([(9, 500 + i % 3)] * 8)
        online.observe(s, 1.1 * prior.predict(s))
    cold = BatchShape.of([(1000, 0)])
    assert online.predict(cold) == pytest.approx(1.1 * prior.predict(cold), rel=0.25)


def test_online_estimator_guard_quantile_is_checked() -> None:
    with pytest.raises(ValueError, match="guard_quantile"):
        OnlineEstimator(LatencyEstimator(0, 0, 0, 1), guard_quantile=1.0)


def test_estimator_json_round_trip_and_refusals(tmp_path) -> None:
    est = LatencyEstimator(a=0.1, b_compute=0.0, b_read=0.2, c=1.5)
    assert LatencyEstimator.from_json(est.to_json(model="m")) == est
    for bad, why in (("{}", "not an estimator"),
                     ('{"coefficients": {"a": 1, "b_compute": 0, "b_read": 0, "c": -1}}',
                      "finite and >= 0"),
                     ("not json", "not an estimator")):
        with pytest.raises(ValueError, match=why):
            LatencyEstimator.from_json(bad)
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        LatencyEstimator.load(path)


def test_online_estimator_shrugs_off_outliers_and_warm_up() -> None:
    """A few batches 20-60× slower than their shape (the device shared with another process,
    a first forward's one-time costs) must not drag the fit: it stays near the truth."""
    rng = np.random.default_rng(2)
    truth = LatencyEstimator(a=0.05, b_compute=1e-5, b_read=2e-4, c=3.0)
    online = OnlineEstimator(truth)
    for _ in range(3):  # warm-up: ignored
        online.observe(_random_shape(rng), 500.0)
    assert online.num_observed == 0
    for i in range(200):
        s = _random_shape(rng)
        slow = 40.0 if i % 13 == 0 else 1.0  # ~8 % of batches disturbed
        online.observe(s, truth.predict(s) * slow * rng.uniform(0.97, 1.03))
    held = [_random_shape(rng) for _ in range(50)]
    assert score(online.current, held, [truth.predict(s) for s in held]).mape < 0.1
    assert online.guard_ms < 0.2 * np.mean([truth.predict(s) for s in held])
