"""Draft-length policies: what each keeps, how the predictor policy takes a swapped model
(between rounds, never inside one), how a process offers them by mode, and that greedy output
through every policy equals the target's own greedy output on held-out prompts, including a
predictor swapped mid-session and a corrupt model that falls back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import (
    ConfidenceStop,
    DraftStep,
    FixedK,
    PolicyCatalog,
    PolicySession,
    PredictorStop,
)
from common.engine.predictor.runtime import OnnxPredictor, PredictorSlot
from common.engine.ucb import UcbSpecStop
from common.errors import ErrorCode, WispError
from common.models.loading import DEFAULT_PREDICTOR
from common.protocol import DRAFT_FEATURES
from tests.shipped import MAX_NEW, greedy_cases, shipped_pair

F = len(DRAFT_FEATURES)
CONF = DRAFT_FEATURES.index("confidence")


def step(sids: list[str], confidences: list[float]) -> DraftStep:
    features = torch.zeros(len(sids), F)
    features[:, CONF] = torch.tensor(confidences)
    return DraftStep(sids, torch.zeros(len(sids), dtype=torch.int64), features)


class ScriptedModel:
    """Stands in for an OnnxPredictor: scores every row `score`."""

    def __init__(self, version: str, score: float, threshold: float = 0.5):
        self.version, self.score, self.threshold = version, score, threshold

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.full(len(features), self.score, np.float32)


def test_confidence_stop_ends_rounds_at_tokens_below_tau() -> None:
    policy = ConfidenceStop.from_arg("0.4")
    assert policy.last(step(["a", "b", "c"], [0.9, 0.4, 0.1])).tolist() == [False, False, True]
    for bad in ("", "0", "1.5", "x"):
        with pytest.raises(ValueError, match="threshold"):
            ConfidenceStop.from_arg(bad)


def test_predictor_stop_takes_a_swapped_model_at_the_next_round_only() -> None:
    keeps, stops = ScriptedModel("keep", 0.1), ScriptedModel("stop", 0.9)
    slot = PredictorSlot()
    slot.current = keeps
    policy = PredictorStop(slot)
    policy.open(PolicySession("s1", "dev", 8))
    assert policy.round_limits(["s1"]) == [8]
    slot.current = stops  # swapped while s1's round is drafting
    assert policy.last(step(["s1"], [0.5])).tolist() == [False]
    assert policy.version_for("s1") == "keep"
    policy.round_limits(["s1"])  # the next round
    assert policy.last(step(["s1"], [0.5])).tolist() == [True]
    assert policy.version_for("s1") == "stop"


def test_predictor_stop_threshold_argument_overrides_the_models() -> None:
    slot = PredictorSlot()
    slot.current = ScriptedModel("m", 0.6, threshold=0.5)
    strict, lenient = PredictorStop(slot), PredictorStop(slot, threshold=0.7)
    for p in (strict, lenient):
        p.open(PolicySession("s", "dev", 8))
        p.round_limits(["s"])
    assert strict.last(step(["s"], [0.5])).tolist() == [True]
    assert lenient.last(step(["s"], [0.5])).tolist() == [False]


def test_predictor_stop_without_a_model_drafts_fixed_k() -> None:
    policy = PredictorStop(PredictorSlot())
    policy.open(PolicySession("s", "dev", 5))
    assert policy.round_limits(["s"]) == [5]
    assert policy.last(step(["s"], [0.01])).tolist() == [False]
    assert policy.version_for("s") is None


def test_catalog_serves_each_mode_with_its_default_policy() -> None:
    slot = PredictorSlot()
    catalog = PolicyCatalog.standard(("sled", "wisp", "ucb"), predictor=slot)
    assert catalog.modes == ("sled", "wisp", "ucb")
    assert isinstance(catalog.for_session("sled", None), FixedK)
    assert isinstance(catalog.for_session("wisp", None), PredictorStop)
    assert isinstance(catalog.for_session("ucb", None), UcbSpecStop)
    assert catalog.for_session("sled", "predictor:0.3").threshold == 0.3
    assert catalog.get("confidence:0.2").spec == "confidence:0.2"
    with pytest.raises(WispError) as err:
        catalog.for_session("wisp", "predictor:7")
    assert err.value.code == ErrorCode.BAD_REQUEST and "threshold" in err.value.message


def test_an_unserved_mode_is_named_with_the_modes_that_are_served() -> None:
    # Without a predictor, `wisp` is not served; the error lists what is.
    catalog = PolicyCatalog.standard(("sled", "wisp", "ucb"))
    assert catalog.modes == ("sled", "ucb")
    with pytest.raises(WispError) as err:
        catalog.for_session("wisp", None)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert "'wisp'" in err.value.message and "['sled', 'ucb']" in err.value.message
    with pytest.raises(WispError, match="unknown draft policy"):
        catalog.for_session("sled", "predictor")


# -- greedy exactness on the shipped pair ----------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return shipped_pair()


@pytest.fixture(scope="module")
def cases(pair):
    return greedy_cases(per_domain=6)


@pytest.fixture(scope="module")
def shipped_model() -> OnnxPredictor:
    return OnnxPredictor.load(DEFAULT_PREDICTOR)


def run(pair, prompts, policy, stagger: int = 1):
    draft, target = pair
    engine = InProcessEngine.from_models(draft, target, 8)
    return engine.generate_many([GenerationRequest(p, MAX_NEW, policy=policy,
                                                   start_step=i * stagger)
                                 for i, p in enumerate(prompts)])


@pytest.mark.parametrize("spec", ["fixed", "fixed:3", "predictor", "predictor:0.3",
                                  "confidence:0.3", "ucb", "ucb:seed=5,arms=1/3/8"])
def test_greedy_output_is_unchanged_by_every_policy(pair, cases, shipped_model, spec) -> None:
    prompts, refs = cases
    slot = PredictorSlot(shipped_model)
    policy = PolicyCatalog.standard(("sled",), predictor=slot).get(spec)
    results = run(pair, prompts, policy)
    for i, (res, ref) in enumerate(zip(results, refs, strict=True)):
        assert res.token_ids == ref, f"{spec}: prompt {i} diverged"
    rounds = [r for res in results for r in res.rounds]
    assert sum(r.accepted for r in rounds) > 0
    if spec.startswith(("predictor", "confidence")):
        # The policy did end rounds early (short of k_max with room left), and said which
        # model.
        assert sum(r.drafted < 8 and r.accepted == r.drafted for r in rounds) > 0
        assert all(r.drafted <= 8 for r in rounds)
    if spec.startswith("predictor"):
        assert {r.predictor_version for r in rounds if r.drafted} == {shipped_model.version}


class SwappingSlot(PredictorSlot):
    """Hands out model A for the first `after` rounds started, then B (a hot swap between
    rounds, in the middle of every session)."""

    def __init__(self, a, b, after: int):
        super().__init__(a)
        self.a, self.b, self.after, self.reads = a, b, after, 0

    @property
    def current(self):
        self.reads += 1
        return self.a if self.reads <= self.after else self.b

    @current.setter
    def current(self, value) -> None:
        pass


def test_greedy_output_survives_a_predictor_swap_mid_session(pair, cases, shipped_model):
    prompts, refs = cases
    eager = ScriptedModel("stops-often", 0.9)  # stops at every token: k = 0 rounds
    slot = SwappingSlot(shipped_model, eager, after=4)
    policy = PredictorStop(slot)
    results = run(pair, prompts, policy, stagger=0)
    assert [res.token_ids for res in results] == refs
    versions = [r.predictor_version for r in results[0].rounds]
    assert versions[0] == shipped_model.version and versions[-1] == "stops-often"


def test_a_corrupt_model_falls_back_and_output_is_unchanged(pair, cases, shipped_model, tmp_path):
    prompts, refs = cases
    slot = PredictorSlot(shipped_model)
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model")
    assert not slot.install_file(bad)
    assert slot.current is shipped_model  # the last good one stays
    assert [r.token_ids for r in run(pair, prompts, PredictorStop(slot))] == refs
    empty = PredictorSlot()
    assert not empty.install_file(bad)
    results = run(pair, prompts, PredictorStop(empty))  # no model at all: fixed k
    assert [r.token_ids for r in results] == refs
    # Without a model the rounds are fixed k_max's, round for round.
    fixed = run(pair, prompts, FixedK(8))
    assert [[r.drafted for r in res.rounds] for res in results] == \
        [[r.drafted for r in res.rounds] for res in fixed]
