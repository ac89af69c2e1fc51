"""The edge session core without NATS: a draft-length policy driven through real rounds, the
request a round sends (draft, features, budget), the verdict applied or resynced, exactness."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.engine.drafter import Draft, DrafterCore
from common.engine.policies import DraftPolicy, DraftStep, RoundFeedback
from common.engine.session import NO_SLO_BUDGET_MS, SessionCore
from common.engine.verifier import VerifierCore
from common.errors import WispError
from common.models.paged_runner import PagedRunner
from common.models.reference import hf_greedy
from common.protocol import DRAFT_FEATURES, SessionSpec, Slo, VerifyRequest, VerifyResult
from tests.unit.tiny_random_models import tiny_llama

CONFIDENCE = DRAFT_FEATURES.index("confidence")


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=5), tiny_llama(seed=6)  # target, draft


class ConfidenceStop(DraftPolicy):
    """Stops a draft at the first token whose confidence is below `threshold`: the shape of
    WISP's predictor policy, with a threshold instead of a model."""

    name = "confidence"

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.calls: list[DraftStep] = []
        self.feedback: list[RoundFeedback] = []

    def last(self, step: DraftStep) -> torch.Tensor:
        self.calls.append(step)
        return step.features[:, CONFIDENCE] < self.threshold

    def observe(self, feedback: RoundFeedback) -> None:
        self.feedback.append(feedback)


class DirectDrafter:
    """DraftPort over a DrafterCore, one session at a time."""

    def __init__(self, core: DrafterCore):
        self.core = core
        self.drafts: list[Draft] = []
        self.resyncs: list[list[int]] = []

    async def draft(self, sid: str) -> Draft:
        self.drafts.append(self.core.draft([sid])[sid])
        return self.drafts[-1]

    async def apply(self, sid, num_accepted, new_tokens, round_trip_s) -> None:
        self.core.apply(sid, num_accepted, new_tokens, round_trip_s)

    async def resync(self, sid, committed) -> None:
        self.resyncs.append(list(committed))
        self.core.resync(sid, committed)


class CoreVerifier:
    """VerifyPort over a real VerifierCore; records every request."""

    def __init__(self, core: VerifierCore, uplink_ms: float = 0.0):
        self.core, self.uplink_ms = core, uplink_ms
        self.requests: list[VerifyRequest] = []

    async def submit(self, request: VerifyRequest) -> VerifyResult:
        self.requests.append(request)
        (out,) = self.core.verify_batch([request])
        if isinstance(out, WispError):
            raise out
        return out.result


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 0.001  # every reading is 1 ms later
        return self.t


def build(models, policy, spec, prompt, uplink_ms=0.0, clock=None):
    target, draft = models
    verifier = VerifierCore(PagedRunner(target, num_blocks=128, block_size=4), None)
    drafter = DrafterCore(PagedRunner(draft, num_blocks=128, block_size=4), None, k_max=8)
    verifier.open_session(spec, prompt)
    drafter.open(spec, prompt, policy)
    port = CoreVerifier(verifier, uplink_ms)
    direct = DirectDrafter(drafter)
    return SessionCore(port, direct, None, clock or Clock()), port, direct


def spec(**kw) -> SessionSpec:
    return SessionSpec(**{"sid": "s", "mode": "wisp", "max_new_tokens": 24, "k_max": 8, **kw})


def test_a_policy_decides_each_draft_and_the_rounds_stay_exact(models):
    target, _ = models
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    policy = ConfidenceStop(threshold=0.05)
    core, port, drafter = build(models, policy, spec(), prompt)
    s = core.session(spec(), prompt)
    asyncio.run(core.run(s))
    assert s.output == hf_greedy(target, prompt, 24)  # the policy never changes the output
    # Each draft ended where the policy said: with its first low-confidence token.
    for draft, request in zip(drafter.drafts, port.requests, strict=True):
        confidence = [row[CONFIDENCE] for row in draft.features]
        assert all(c >= 0.05 for c in confidence[:-1])
        assert request.draft_ids == draft.token_ids
        assert request.draft_features == draft.features  # the features travel with the round
    assert any(len(r.draft_ids) < 8 for r in port.requests[:-1]), "the policy never stopped one"
    # One `last` call per draft step, and a verdict per round with the features it saw.
    assert len(policy.feedback) == s.stats.rounds == len(port.requests)
    assert [f.num_drafted for f in policy.feedback] == [len(r.draft_ids) for r in port.requests]
    assert all(f.round_trip_s is not None and f.round_trip_s > 0 for f in policy.feedback)
    assert s.stats.drafted == sum(len(r.draft_ids) for r in port.requests)


def test_round_budgets_follow_the_slo(models):
    prompt = [7, 7, 7, 7]
    slo = Slo(ttft_ms=400.0, tpot_ms=50.0)
    clock = Clock()
    sp = spec(slo=slo, max_new_tokens=6)
    core, port, _ = build(models, ConfidenceStop(0.0), sp, prompt, uplink_ms=10.0, clock=clock)
    s = core.session(sp, prompt)
    asyncio.run(core.run(s))
    first, *later = port.requests
    assert 390.0 < first.budget_ms < 400.0  # the TTFT SLO less the time since the start
    for r in later:  # (k + 1) TPOT, less drafting and the uplink
        assert r.budget_ms == pytest.approx((len(r.draft_ids) + 1) * 50.0 - r.draft_ms - 10.0)
    no_slo, port2, _ = build(models, ConfidenceStop(0.0), spec(), prompt)
    asyncio.run(no_slo.round(no_slo.session(spec(), prompt)))
    assert port2.requests[0].budget_ms == NO_SLO_BUDGET_MS


def test_a_verdict_for_another_edges_draft_resyncs_the_drafter(models):
    target, _ = models
    prompt = [2, 7, 1, 8, 2, 8]
    ref = hf_greedy(target, prompt, 12)
    core, port, drafter = build(models, ConfidenceStop(0.0), spec(max_new_tokens=12), prompt)
    real_submit = port.submit

    async def someone_else_answered(request: VerifyRequest) -> VerifyResult:
        result = await real_submit(request)
        if request.round == 0:  # the stored answer of round 0 was for another edge's draft
            return VerifyResult(sid="s", round=0, num_drafted=3, num_accepted=2,
                                new_tokens=ref[:3], committed_len=len(prompt) + 3,
                                finished=False)
        return result

    # The real verifier and the stored answer agree on the tokens (both are the target's
    # greedy output); only the draft they verified differs from this edge's.
    port.submit = someone_else_answered
    s = core.session(spec(max_new_tokens=12), prompt)
    asyncio.run(core.round(s))
    assert drafter.drafts[0].token_ids[:2] != ref[:2]  # so the verdict was not on our draft
    assert drafter.resyncs == [prompt + ref[:3]]
    assert s.committed == prompt + ref[:3]
    assert drafter.core.committed("s") == prompt + ref[:3]
    assert drafter.core.runner.cached_len("s") <= len(s.committed) - 1
    port.submit = real_submit
    port.core.close_session("s")  # the verifier rebuilds from the committed tokens
    port.core.open_session(spec(max_new_tokens=12), prompt, ref[:3], last_round=0)
    asyncio.run(core.run(s))
    assert s.output == ref
