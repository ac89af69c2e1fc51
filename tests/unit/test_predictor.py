"""The rejection predictor offline: pair labels, the replayed cost of a stopping rule, the
threshold choice, training, ONNX export and the checks that guard the runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from common.engine.predictor.cost import CostModel, classification, replay
from common.engine.predictor.model import RejectionModel, TrainSettings, export_onnx, fit
from common.engine.predictor.pairs import PairSet
from common.engine.predictor.runtime import OnnxPredictor, PredictorError, PredictorSlot
from common.engine.predictor.train import NEVER, choose_threshold, evaluate, fit_candidate
from common.protocol import DRAFT_FEATURES

F = len(DRAFT_FEATURES)
CONF = DRAFT_FEATURES.index("confidence")


def rows(confidences: list[float]) -> list[list[float]]:
    out = []
    for i, c in enumerate(confidences):
        r = [0.0] * F
        r[CONF], r[DRAFT_FEATURES.index("position")] = c, float(i)
        out.append(r)
    return out


def synthetic(n_rounds: int, seed: int, k: int = 8) -> PairSet:
    """Rounds whose tokens are accepted with probability = their confidence, until the first
    rejection (later tokens count as rejected, as in a real verdict)."""
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(n_rounds):
        conf = rng.beta(2, 1, size=k).tolist()
        accepted = 0
        while accepted < k and rng.random() < conf[accepted]:
            accepted += 1
        rounds.append((rows(conf), accepted))
    return PairSet.from_rounds(rounds, "code", 0.0)


@pytest.fixture(scope="module")
def trained() -> tuple[RejectionModel, bytes, PairSet]:
    pairs = synthetic(600, seed=1)
    model = fit(RejectionModel(), pairs.features, pairs.accepted, TrainSettings(epochs=40))
    return model, export_onnx(model, {"version": "test-1", "threshold": 0.6}), pairs


def test_labels_count_every_token_after_the_first_rejection_as_rejected() -> None:
    p = PairSet.from_rounds([(rows([0.9, 0.8, 0.7, 0.6]), 2), (rows([0.5]), 1)], "prose", 0.8)
    assert p.accepted.tolist() == [True, True, False, False, True]
    assert p.round_id.tolist() == [0, 0, 0, 0, 1]
    assert p.round_starts().tolist() == [0, 4, 5]
    assert p.temperature.tolist() == pytest.approx([0.8] * 5)


def test_concat_keeps_rounds_apart_and_save_load_round_trips(tmp_path) -> None:
    a = PairSet.from_rounds([(rows([0.9, 0.1]), 1)], "code", 0.0)
    b = PairSet.from_rounds([(rows([0.5, 0.5]), 2)], "prose", 0.0)  # round id 0 again
    both = PairSet.concat([a, b])
    assert both.round_starts().tolist() == [0, 2, 4]
    both.save(tmp_path / "p.npz")
    back = PairSet.load(tmp_path / "p.npz")
    assert np.array_equal(back.features, both.features)
    assert back.accepted.tolist() == both.accepted.tolist()
    assert len(back.of_domain("prose")) == 2


def test_load_refuses_pairs_of_other_features(tmp_path) -> None:
    p = PairSet.from_rounds([(rows([0.9]), 1)], "code", 0.0)
    np.savez(tmp_path / "old.npz", features=p.features[:, :5], accepted=p.accepted,
             round_id=p.round_id, domain=p.domain, temperature=p.temperature,
             feature_names=np.asarray(DRAFT_FEATURES[:5]))
    with pytest.raises(ValueError, match="collect again"):
        PairSet.load(tmp_path / "old.npz")


def test_replay_ends_the_round_with_the_first_high_score() -> None:
    p = PairSet.from_rounds([(rows([0.9, 0.8, 0.7, 0.6]), 2)], "code", 0.0)
    scores = np.array([0.1, 0.2, 0.9, 0.3])
    cost = CostModel(draft_step_ms=10.0, rtt_ms=50.0, verify_ms=20.0)
    stop = replay(p, scores, 0.5, cost)
    # Tokens 0..2 drafted and sent (token 2, scored 0.9, ends the round); 2 accepted.
    assert (stop.steps, stop.drafted, stop.accepted, stop.committed) == (3, 3, 2, 3)
    assert stop.wasted_steps == 1 and stop.cost_ms == 3 * 10 + 50 + 20
    # A false alarm costs nothing: scored high at an accepted token, it is still sent.
    early = replay(p, np.array([0.9, 0.1, 0.1, 0.1]), 0.5, cost)
    assert (early.drafted, early.accepted, early.wasted_steps) == (1, 1, 0)
    never = replay(p, scores, NEVER, cost)
    assert (never.steps, never.drafted, never.accepted, never.wasted_steps) == (4, 4, 2, 2)
    assert never.per_committed(cost)["wdt_ms"] == pytest.approx(2 * 10 / 3)


def test_classification_counts_rejection_as_positive() -> None:
    accepted = np.array([True, True, False, False])
    scores = np.array([0.9, 0.1, 0.8, 0.2])  # one false alarm, one hit, one miss
    m = classification(accepted, scores, 0.5)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["false_alarm"] == 0.5


def test_threshold_by_cost_follows_the_price_of_a_round_trip() -> None:
    pairs = synthetic(400, seed=2)
    scores = 1.0 - pairs.features[:, CONF]
    cheap_rtt, cheap_cost = choose_threshold(scores, pairs, CostModel(25.0, 1.0, 1.0, 0))
    dear_rtt, _ = choose_threshold(scores, pairs, CostModel(1.0, 500.0, 20.0, 0))
    # Drafting dear and round trips cheap: stop early (a low threshold); the other way round,
    # hardly ever stop.
    assert cheap_rtt < dear_rtt
    fixed = replay(pairs, scores, NEVER, CostModel(25.0, 1.0, 1.0))
    assert cheap_cost <= fixed.per_committed(CostModel(25.0, 1.0, 1.0))["cost_ms"]


def test_threshold_choice_keeps_within_the_round_cap() -> None:
    pairs = synthetic(400, seed=5)
    scores = 1.0 - pairs.features[:, CONF]
    free, capped = CostModel(25.0, 1.0, 1.0, 0), CostModel(25.0, 1.0, 1.0, 1.2)
    fixed = replay(pairs, scores, NEVER, free).per_committed(free)["rounds"]
    t_free, _ = choose_threshold(scores, pairs, free)
    t_capped, _ = choose_threshold(scores, pairs, capped)
    assert replay(pairs, scores, t_free, free).per_committed(free)["rounds"] > 1.2 * fixed
    assert replay(pairs, scores, t_capped, free).per_committed(free)["rounds"] <= 1.2 * fixed


def test_trained_mlp_beats_fixed_k_on_held_out_rounds_of_its_own_kind() -> None:
    cost = CostModel(25.0, 60.0, 20.0)
    cand = fit_candidate("mlp", synthetic(800, seed=3), cost, TrainSettings(epochs=30))
    report = evaluate(cand, synthetic(300, seed=4), cost)
    assert report["vs_fixed_k_max"]["cost_ms"] < 1.0
    assert report["vs_fixed_k_max"]["wdt_ms"] < 0.8


def test_onnx_and_torch_agree(trained) -> None:
    model, data, pairs = trained
    onnx_model = OnnxPredictor(data, "test")
    x = synthetic(100, seed=9).features
    assert np.allclose(onnx_model.predict(x), model.predict(x), atol=1e-5)
    assert onnx_model.version == "test-1" and onnx_model.threshold == 0.6
    assert onnx_model.latency.calls == 1


def _with_metadata(data: bytes, **changes: str) -> bytes:
    proto = onnx.load_from_string(data)
    for entry in proto.metadata_props:
        key = entry.key.removeprefix("wisp.")
        if key in changes:
            entry.value = changes[key]
    return proto.SerializeToString()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d[: len(d) // 2], "not a loadable ONNX model"),
    (lambda d: b"garbage" * 10, "not a loadable ONNX model"),
    (lambda d: _with_metadata(d, feature_names='["confidence"]'), "trained on features"),
    (lambda d: _with_metadata(d, format='"other/9"'), "format"),
    (lambda d: _with_metadata(d, threshold="1.5"), "threshold"),
    (lambda d: _with_metadata(d, threshold="not json"), "not JSON"),
])
def test_a_model_that_cannot_serve_is_refused(trained, mutate, match) -> None:
    _, data, _ = trained
    with pytest.raises(PredictorError, match=match):
        OnnxPredictor(mutate(data), "bad")


def test_slot_keeps_the_last_good_model(trained, tmp_path) -> None:
    _, data, _ = trained
    slot = PredictorSlot()
    assert not slot.install(b"corrupt", "corrupt") and slot.current is None
    assert slot.install(data, "good") and slot.version == "test-1"
    assert not slot.install(data[:100], "truncated") and slot.version == "test-1"
    assert not slot.install_file(tmp_path / "missing.onnx") and slot.version == "test-1"


def test_shipped_predictor_onnx_and_torch_agree_on_held_out_rows() -> None:
    from pathlib import Path

    from common.engine.predictor.release import load_torch
    from common.models.loading import DEFAULT_PREDICTOR

    folder = Path(DEFAULT_PREDICTOR).parent
    rows_ = PairSet.load(folder / "heldout_sample.npz")
    assert len(rows_) >= 1000
    onnx_model = OnnxPredictor.load(DEFAULT_PREDICTOR)
    torch_model = load_torch(folder / "predictor.pt")
    with torch.no_grad():
        assert np.allclose(onnx_model.predict(rows_.features), torch_model.predict(rows_.features),
                           atol=1e-5)
