"""The verification-time estimator: the shape features, the non-negative least-squares fit,
held-out scoring, the coefficients file, and a calibration run on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.engine.calibrate import calibrate
from common.engine.estimator import BatchShape, LatencyEstimator, fit, score
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
    import structlog

    saved = structlog.get_config()
    try:
        assert main(["calibrate", "--quick", "--repeats", "1", "--json",
                     "--out", str(tmp_path / "est.json")]) == 0
    finally:
        structlog.configure(**saved)
    out = json.loads(capsys.readouterr().out)
    for key in ("r2", "mape", "mae_ms", "n_fit", "n_heldout", "coefficients"):
        assert key in out, key
    assert out["n_fit"] == 18 and out["n_heldout"] == 6 and out["mape"] >= 0
    assert LatencyEstimator.load(tmp_path / "est.json").as_dict() == out["coefficients"]
