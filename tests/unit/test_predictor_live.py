"""The predictor service's NATS-free logic (services/predictor/live.py): live labels, live
statistics, the retrain triggers and the accept rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from common.engine.predictor.cost import CostModel, classification
from common.engine.predictor.model import TrainSettings
from common.protocol import DRAFT_FEATURES, VerdictEvent
from services.predictor.live import (
    Confusion,
    LiveRound,
    LiveRows,
    LiveStats,
    RetrainTriggers,
    accepts,
    retrain,
    to_pairs,
    verdict_round,
)
from services.predictor.service import PredictorConfig

F = len(DRAFT_FEATURES)
CONF = DRAFT_FEATURES.index("confidence")
DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


class ScoreIsDoubt:
    """A stand-in predictor with a known rule: p_reject = 1 - confidence."""

    def __init__(self, threshold: float = 0.5, version: str = "doubt"):
        self.threshold, self.version = threshold, version

    def predict(self, features: np.ndarray, timed: bool = True) -> np.ndarray:
        return 1.0 - features[:, CONF]


class Oracle:
    """Scores 1 exactly where the synthetic rule rejects: the cheapest possible stopping."""

    threshold, version = 0.5, "oracle"

    def predict(self, features: np.ndarray, timed: bool = True) -> np.ndarray:
        return (features[:, CONF] < 0.5).astype(np.float32)


def synthetic_round(rng: np.random.Generator, k: int = 8, noise: float = 0.0
                    ) -> tuple[list[list[float]], int]:
    """k feature rows and num_accepted; a token is accepted iff its confidence >= 0.5 (each
    verdict flipped with probability `noise`), and the round's run ends at the first reject."""
    conf = rng.random(k)
    ok = (conf >= 0.5) ^ (rng.random(k) < noise)
    num_accepted = int(np.argmin(ok)) if not ok.all() else k
    cum = np.cumprod(conf)
    rows = [[float(c), float(1 - c), float(0.9 * c), 0.1, float(j), float(cum[j]), 0.5]
            for j, c in enumerate(conf)]
    return rows, num_accepted


def verdict(rows: list[list[float]] | None, num_accepted: int, greedy: bool = True,
            num_drafted: int | None = None) -> VerdictEvent:
    return VerdictEvent(ts_ms=1.0, sid="s1", round=0, device_id="edge0", greedy=greedy,
                        num_drafted=len(rows) if num_drafted is None else num_drafted,
                        num_accepted=num_accepted, draft_features=rows)


def rows_with_confidence(confs: list[float]) -> list[list[float]]:
    return [[c, 1 - c, c, 0.1, float(j), c, 0.5] for j, c in enumerate(confs)]


def test_labels_from_a_verdict_reject_everything_after_the_first_rejection():
    live = verdict_round(verdict(rows_with_confidence([0.9, 0.8, 0.2, 0.95]), 2, greedy=False))
    assert live.accepted.tolist() == [True, True, False, False]
    assert live.features.shape == (4, F) and live.features.dtype == np.float32
    assert not live.greedy
    assert verdict_round(verdict(None, 0, num_drafted=0)) is None
    assert verdict_round(verdict([], 0)) is None
    pairs = to_pairs([live, verdict_round(verdict(rows_with_confidence([0.7]), 1))])
    assert pairs.round_id.tolist() == [0, 0, 0, 0, 1]
    assert pairs.temperature.tolist() == [1.0] * 4 + [0.0]  # sampled, then greedy
    assert pairs.accepted.tolist() == [True, True, False, False, True]


def test_a_censored_round_is_not_learnt_from():
    ev = verdict(rows_with_confidence([0.9, 0.8]), 2)
    cut = VerdictEvent(**{f: getattr(ev, f) for f in ev.__struct_fields__}
                       | {"censored": True, "policy": "predictor"})
    assert verdict_round(ev) is not None and verdict_round(cut) is None


def test_live_rows_keep_the_newest_whole_rounds():
    rows = LiveRows(max_rows=5)
    for n in (3, 2, 3):
        rows.add(LiveRound(np.zeros((n, F), np.float32), np.ones(n, bool), True))
    assert (rows.rows, rows.seen, rows.new_rows) == (5, 8, 8)  # the first round went
    assert len(rows.pairs()) == 5
    rows.mark_retrain()
    assert rows.new_rows == 0 and rows.rows == 5


def test_live_precision_recall_false_alarm_on_a_hand_made_case():
    stats = LiveStats(window_rows=100)
    model = ScoreIsDoubt(threshold=0.5)  # predicts "rejected" where confidence <= 0.5
    # Round 1: confidences .9 .4 .8, accepted 1 -> labels A R R; predicted - R -
    # Round 2: confidences .3 .9, accepted 2 -> labels A A; predicted R -
    stats.observe(verdict_round(verdict(rows_with_confidence([0.9, 0.4, 0.8]), 1)), model)
    stats.observe(verdict_round(verdict(rows_with_confidence([0.3, 0.9]), 2)), model)
    # tp = 1 (.4), fp = 1 (.3), fn = 1 (.8), tn = 2
    assert dataclasses.astuple(stats.total) == (1, 1, 1, 2)
    assert stats.total.rates() == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "false_alarm": 1 / 3})
    # The same numbers as the offline definition.
    accepted = np.array([True, False, False, True, True])
    scores = 1 - np.array([0.9, 0.4, 0.8, 0.3, 0.9])
    offline = classification(accepted, scores, 0.5)
    assert stats.total.rates() == pytest.approx({k: offline[k] for k in
                                                 ("precision", "recall", "false_alarm")})
    # A new model starts new statistics.
    stats.observe(verdict_round(verdict(rows_with_confidence([0.9]), 1)), ScoreIsDoubt())
    assert stats.total.rows == 1
    assert Confusion().rates() is None


def test_window_slides_and_drift_is_measured_against_the_first_full_window():
    stats = LiveStats(window_rows=4)
    model = ScoreIsDoubt(threshold=0.5)
    calm = rows_with_confidence([0.9, 0.8])  # both accepted, neither predicted rejected
    stats.observe(verdict_round(verdict(calm, 2)), model)
    assert stats.baseline_false_alarm is None and stats.drift() is None  # window not full
    stats.observe(verdict_round(verdict(calm, 2)), model)
    assert stats.baseline_false_alarm == 0.0 and stats.drift() == 0.0
    alarms = rows_with_confidence([0.3, 0.2])  # both accepted, both predicted rejected
    stats.observe(verdict_round(verdict(alarms, 2)), model)
    stats.observe(verdict_round(verdict(alarms, 2)), model)
    assert stats.window.rows == 4  # the calm rounds slid out
    assert stats.drift() == pytest.approx(1.0)
    assert stats.total.rates()["false_alarm"] == pytest.approx(0.5)
    assert stats.baseline_false_alarm == 0.0  # the baseline stays that of the first window

    triggers = RetrainTriggers(every_rows=0, interval_s=0, min_rows=4, window_rows=4,
                               drift_false_alarm=0.2)
    assert triggers.due(total_rows=8, new_rows=8, since_last_s=1.0, drift=stats.drift()) \
        == "drift"
    # Not on a window that is partly older than the last retrain, nor on a small drift.
    assert triggers.due(total_rows=8, new_rows=3, since_last_s=1.0, drift=1.0) is None
    assert triggers.due(total_rows=8, new_rows=8, since_last_s=1.0, drift=0.1) is None
    off = dataclasses.replace(triggers, drift_false_alarm=0.0)
    assert off.due(total_rows=8, new_rows=8, since_last_s=1.0, drift=1.0) is None


def test_row_and_interval_triggers():
    triggers = RetrainTriggers(every_rows=100, interval_s=60, min_rows=20, window_rows=10,
                               drift_false_alarm=0.0)
    due = triggers.due
    assert due(total_rows=10, new_rows=10, since_last_s=999, drift=None) is None  # < min_rows
    assert due(total_rows=500, new_rows=0, since_last_s=999, drift=None) is None  # nothing new
    assert due(total_rows=500, new_rows=100, since_last_s=1, drift=None) == "rows"
    assert due(total_rows=500, new_rows=30, since_last_s=61, drift=None) == "interval"
    assert due(total_rows=500, new_rows=10, since_last_s=61, drift=None) is None
    assert due(total_rows=500, new_rows=30, since_last_s=59, drift=None) is None


def test_accept_rule_is_not_worse_and_a_tie_goes_to_the_candidate():
    assert accepts(10.0, 10.5)
    assert accepts(10.0, 10.0)
    assert not accepts(10.01, 10.0)


@pytest.fixture(scope="module")
def synthetic_pairs():
    rng = np.random.default_rng(0)
    rounds = [synthetic_round(rng, noise=0.02) for _ in range(250)]
    return to_pairs([LiveRound(np.asarray(r, np.float32), np.arange(len(r)) < a, True)
                     for r, a in rounds])


def test_retrain_accepts_a_candidate_that_beats_a_bad_model(synthetic_pairs):
    cost = CostModel()
    bad = ScoreIsDoubt(threshold=0.05)  # stops at nearly every token: tokens never sent
    result = retrain(synthetic_pairs, None, bad, cost, TrainSettings(epochs=20), 0.3, seed=1)
    assert result.accepted, result.why
    assert result.candidate_cost_ms < result.current_cost_ms
    assert 0.0 < result.threshold <= 1.0
    assert result.holdout_rows > 0 and result.train_rows + result.holdout_rows == \
        len(synthetic_pairs)
    # No model at all is judged as fixed k_max, which a good candidate beats too.
    assert retrain(synthetic_pairs, None, None, cost, TrainSettings(epochs=20), 0.3,
                   seed=1).accepted


def test_retrain_rejects_a_candidate_worse_than_the_current_model(synthetic_pairs):
    # An untrained candidate (one epoch at a vanishing rate) against the best possible rule.
    result = retrain(synthetic_pairs, None, Oracle(), CostModel(),
                     TrainSettings(epochs=1, lr=1e-9), 0.3, seed=1)
    assert not result.accepted
    assert result.candidate_cost_ms > result.current_cost_ms
    assert "worse" in result.why and "oracle" in result.why


def test_retrain_with_too_few_rounds_is_a_rejection_not_an_error(synthetic_pairs):
    tiny = synthetic_pairs.select(synthetic_pairs.round_id < 1)
    result = retrain(tiny, None, None, CostModel(), TrainSettings(epochs=1), 0.3, seed=0)
    assert not result.accepted and result.model is None
    assert "too few" in result.why


def test_every_predictor_setting_is_documented():
    for f in dataclasses.fields(PredictorConfig):
        flag, env = "--" + f.name.replace("_", "-"), "WISP_" + f.name.upper()
        assert f"| `{flag}` | `{env}` |" in DOC, f"PredictorConfig.{f.name} is not documented"


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="holdout_frac"):
        PredictorConfig(holdout_frac=1.0)
    with pytest.raises(ValueError, match="window_rows"):
        PredictorConfig(window_rows=0)
    with pytest.raises(ValueError, match="drift_false_alarm"):
        PredictorConfig(drift_false_alarm=2.0)
