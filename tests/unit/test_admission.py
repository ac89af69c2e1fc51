"""Admission control on a hand-made linear estimator, so that every boundary is exact.

With a = 1 ms per fed token, c = 10 ms per batch and nothing else, a batch of n warm rounds
drafting k = 3 (4 positions fed each) takes T̂ = 4n + 10 ms, and a round waiting behind one
batch in flight W = 2·T̂ = 8n + 20 ms (+ δ). A TPOT SLO of 30 ms with the default server share
of a half gives the server 0.5 · 4 · 30 = 60 ms per round: five sessions fit (W = 60), six do
not (W = 68).
"""

from __future__ import annotations

import pytest

from common.engine.estimator import LatencyEstimator
from common.protocol import AdmissionEvent, Slo, decode, encode
from services.admission_scheduler.admission import (
    DEFAULT_RETRY_AFTER_MS,
    MAX_RETRY_AFTER_MS,
    MIN_RETRY_AFTER_MS,
    AdmissionController,
    AdmittedSession,
    Candidate,
)

EST = LatencyEstimator(a=1.0, b_compute=0.0, b_read=0.0, c=10.0)
K = 3
TIGHT = Slo(ttft_ms=10_000.0, tpot_ms=30.0)  # nominal server budget 60 ms per round
LOOSE = Slo(ttft_ms=10_000.0, tpot_ms=1_000.0)


def session(slo: Slo | None = None, *, remaining: int = 100, context: int = 50,
            budget: float | None = None, per_round: float | None = None,
            sid: str = "") -> AdmittedSession:
    return AdmittedSession(k=K, context_len=context, remaining_tokens=remaining, slo=slo,
                           server_budget_ms=budget, tokens_per_round=per_round, sid=sid)


def candidate(slo: Slo | None = TIGHT, *, prompt: int = 10, max_new: int = 64) -> Candidate:
    return Candidate(prompt_len=prompt, k=K, max_new_tokens=max_new, slo=slo)


# -- the per-round load ----------------------------------------------------------------------------
@pytest.mark.parametrize(("admitted", "admit"), [(4, True), (5, False)])
def test_candidates_budget_bounds_the_sessions_of_a_verifier(admitted: int, admit: bool) -> None:
    d = AdmissionController().decide(candidate(), [session()] * admitted, EST)
    assert d.admit is admit
    assert d.predicted_round_ms == pytest.approx(8 * (admitted + 1) + 20)
    assert d.budget_ms == pytest.approx(60.0)
    if admit:
        assert d.retry_after_ms == 0.0 and "fits the tightest budget 60 ms" in d.reason
    else:
        assert d.retry_after_ms > 0.0
        assert d.reason.startswith("predicted 68 ms per round with 6 sessions exceeds the "
                                   "tightest budget 60 ms")


@pytest.mark.parametrize(("admitted", "admit"), [(4, True), (5, False)])
def test_an_admitted_sessions_budget_protects_it(admitted: int, admit: bool) -> None:
    # The candidate has no SLO; one admitted session's SLO decides, named in the reason.
    sessions = [session()] * (admitted - 1) + [session(TIGHT, sid="s-tight")]
    d = AdmissionController().decide(candidate(None), sessions, EST)
    assert d.admit is admit and d.budget_ms == pytest.approx(60.0)
    if not admit:
        assert "(session s-tight)" in d.reason


@pytest.mark.parametrize(("admitted", "admit"), [(2, True), (3, False)])
def test_an_observed_budget_replaces_the_nominal_one(admitted: int, admit: bool) -> None:
    # 44 ms observed (what its edge left, less the downlink) instead of its nominal 2000 ms:
    # W = 8n + 20 <= 44 up to n = 3 sessions, the candidate included.
    sessions = [session()] * (admitted - 1) + [session(LOOSE, budget=44.0)]
    d = AdmissionController().decide(candidate(None), sessions, EST)
    assert d.admit is admit and d.budget_ms == pytest.approx(44.0)


@pytest.mark.parametrize(("admitted", "admit"), [(3, True), (4, False)])
def test_the_guard_is_charged_once_per_round(admitted: int, admit: bool) -> None:
    # δ = 8: W = 8n + 28 <= 60 up to n = 4.
    d = AdmissionController().decide(candidate(), [session()] * admitted, EST, guard_ms=8.0)
    assert d.admit is admit
    assert d.predicted_round_ms == pytest.approx(8 * (admitted + 1) + 28)


def test_more_batches_in_flight_mean_a_longer_wait() -> None:
    # m = 2: W = 3·T̂ = 12n + 30 <= 60 up to n = 2 (n = 3 gives 66).
    controller = AdmissionController(batches_in_flight=2)
    assert controller.decide(candidate(), [session()], EST).admit
    refused = controller.decide(candidate(), [session()] * 2, EST)
    assert not refused.admit and refused.predicted_round_ms == pytest.approx(66.0)


def test_server_share_scales_the_nominal_budget() -> None:
    # Share 0.75: 0.75 · 4 · 30 = 90 ms; W = 8n + 20 <= 90 up to n = 8.
    controller = AdmissionController(server_share=0.75)
    assert controller.decide(candidate(), [session()] * 7, EST).admit
    assert not controller.decide(candidate(), [session()] * 8, EST).admit
    # A session's own share (a server-side mode's 1.0) overrides the controller's.
    own = Candidate(prompt_len=10, k=K, max_new_tokens=64, slo=TIGHT, server_share=1.0)
    d = AdmissionController().decide(own, [session()] * 10, EST)
    assert d.admit and d.budget_ms == pytest.approx(120.0)  # 8 · 12 + 20 = 116


def test_rows_take_the_context_halfway_through_what_remains() -> None:
    est = LatencyEstimator(a=0.0, b_compute=0.0, b_read=0.01, c=0.0)
    d = AdmissionController().decide(candidate(None, prompt=100, max_new=200),
                                     [session(context=1000, remaining=1000)], est)
    # cached: 1000 + 500 for the admitted one, 100 + 100 for the candidate; two batches.
    assert d.predicted_round_ms == pytest.approx(2 * 0.01 * (1500 + 200))


# -- what does not constrain -----------------------------------------------------------------------
def test_sessions_without_an_slo_add_load_but_constrain_nothing() -> None:
    controller = AdmissionController()
    crowd = [session()] * 500
    d = controller.decide(candidate(None), crowd, EST)
    assert d.admit and d.budget_ms is None
    assert d.predicted_round_ms == pytest.approx(8 * 501 + 20)
    assert "no session with an attainable SLO" in d.reason
    # ... but their load counts against a session that has one.
    assert not controller.decide(candidate(), crowd, EST).admit


def test_an_slo_out_of_reach_even_alone_constrains_nothing() -> None:
    controller = AdmissionController()
    # A late edge (its budget went negative) or an SLO tighter than a lone round (14 ms here)
    # cannot be helped by refusing others.
    hopeless = [session(LOOSE, budget=-5.0), session(Slo(ttft_ms=1e4, tpot_ms=5.0))]
    d = controller.decide(candidate(None), hopeless + [session()] * 20, EST)
    assert d.admit and d.budget_ms is None
    d = controller.decide(candidate(Slo(ttft_ms=1e4, tpot_ms=5.0)), [session()] * 20, EST)
    assert d.admit and d.budget_ms is None and "out of reach" in d.reason
    # Within reach alone, the same budget binds.
    reachable = [session(LOOSE, budget=30.0)]
    assert not controller.decide(candidate(None), reachable + [session()] * 2, EST).admit


# -- the first token -------------------------------------------------------------------------------
@pytest.mark.parametrize(("admitted", "admit", "prefill"), [(2, True, 49.0), (3, False, 57.0)])
def test_the_prefill_must_fit_the_ttft(admitted: int, admit: bool, prefill: float) -> None:
    # TTFT 100 ms, half of it the server's. A 10-token prompt with k = 3 feeds 13 tokens: it
    # waits for the batch in flight (4n + 10) and runs with everyone (4n + 13 + 10).
    slo = Slo(ttft_ms=100.0, tpot_ms=1_000.0)
    d = AdmissionController().decide(candidate(slo), [session()] * admitted, EST)
    assert d.admit is admit and d.prefill_ms == pytest.approx(prefill)
    if not admit:
        assert "first round 57 ms" in d.reason and "TTFT budget 50 ms" in d.reason
        assert d.retry_after_ms > 0


def test_a_prompt_too_long_for_the_ttft_even_alone_is_not_refused_for_it() -> None:
    slo = Slo(ttft_ms=100.0, tpot_ms=1_000.0)  # alone: 100 + 3 + 10 = 113 ms > 50 ms
    d = AdmissionController().decide(candidate(slo, prompt=100), [session()] * 3, EST)
    assert d.admit and d.prefill_ms > 50.0


# -- the cap and no estimator ----------------------------------------------------------------------
@pytest.mark.parametrize("estimator", [EST, None])
def test_the_hard_cap_holds_whatever_the_estimate(estimator: LatencyEstimator | None) -> None:
    controller = AdmissionController(max_sessions_per_verifier=3)
    assert controller.decide(candidate(None), [session()] * 2, estimator).admit
    d = controller.decide(candidate(None), [session()] * 3, estimator)
    assert not d.admit and "max_sessions_per_verifier = 3" in d.reason
    assert MIN_RETRY_AFTER_MS <= d.retry_after_ms <= MAX_RETRY_AFTER_MS


def test_without_an_estimator_only_the_cap_decides() -> None:
    d = AdmissionController().decide(candidate(), [session(TIGHT)] * 1000, None)
    assert d.admit and d.predicted_round_ms == 0.0 and d.budget_ms is None
    assert "no latency estimate" in d.reason


# -- retry after -----------------------------------------------------------------------------------
def test_retry_after_is_the_soonest_expected_finish() -> None:
    controller = AdmissionController()
    # Two sessions: W now = 2 · (8 + 10) = 36 ms. 100 tokens at 2 a round: 50 rounds, 1800 ms;
    # 39 tokens at 1 a round: 39 rounds, 1404 ms.
    sessions = [session(remaining=100, per_round=2.0), session(remaining=39, per_round=1.0)]
    assert controller.retry_after_ms(sessions, EST) == pytest.approx(1404.0)
    # Unknown progress counts as k + 1 tokens a round: 39 tokens in 10 rounds.
    unknown = [session(remaining=100, per_round=2.0), session(remaining=39)]
    assert controller.retry_after_ms(unknown, EST) == pytest.approx(360.0)
    # Heavier load, later; a session nearer its end, sooner.
    assert controller.retry_after_ms(sessions + [session(remaining=10_000)] * 4, EST) > 1404.0
    nearer = [session(remaining=100, per_round=2.0), session(remaining=20, per_round=1.0)]
    assert controller.retry_after_ms(nearer, EST) < 1404.0
    # A refusal carries it.
    d = controller.decide(candidate(), sessions + [session(remaining=10_000)] * 4, EST)
    assert not d.admit and d.retry_after_ms == pytest.approx(39 * 2 * (4 * 6 + 10))


def test_retry_after_is_clamped() -> None:
    controller = AdmissionController()
    assert controller.retry_after_ms([session(remaining=0)], EST) == MIN_RETRY_AFTER_MS
    assert controller.retry_after_ms([session(remaining=1)], EST) == MIN_RETRY_AFTER_MS
    endless = [session(remaining=10**6, per_round=1.0)]
    assert controller.retry_after_ms(endless, EST) == MAX_RETRY_AFTER_MS
    assert controller.retry_after_ms([], EST) == DEFAULT_RETRY_AFTER_MS


def test_retry_after_without_an_estimator_goes_by_the_slo() -> None:
    controller = AdmissionController()
    # At its TPOT of 30 ms, 40 tokens take 1200 ms; a session without an SLO tells nothing.
    assert controller.retry_after_ms([session(TIGHT, remaining=40), session()], None) == \
        pytest.approx(1200.0)
    assert controller.retry_after_ms([session()], None) == DEFAULT_RETRY_AFTER_MS


# -- the decision as an event ----------------------------------------------------------------------
def test_decisions_become_admission_events() -> None:
    controller = AdmissionController()
    refused = controller.decide(candidate(), [session()] * 5, EST)
    ev = refused.event(sid="sid-1", ts_ms=5.0, verifier_id="v0")
    assert (ev.outcome, ev.budget_ms, ev.predicted_round_ms) == ("refused", 60.0, 68.0)
    assert ev.retry_after_ms == refused.retry_after_ms > 0
    assert decode(AdmissionEvent, encode(ev)) == ev
    admitted = controller.decide(candidate(None), [], EST)
    ev = admitted.event(sid="sid-2", ts_ms=5.0)
    assert (ev.outcome, ev.budget_ms, ev.verifier_id) == ("admitted", 0.0, None)
    assert refused.event(sid="sid-3", ts_ms=5.0, outcome="queued").outcome == "queued"


@pytest.mark.parametrize("kwargs", [{"server_share": 0.0}, {"server_share": 1.5},
                                    {"max_sessions_per_verifier": -1},
                                    {"batches_in_flight": 0}])
def test_controller_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdmissionController(**kwargs)


def test_the_session_table_and_an_open_as_admission_sees_them() -> None:
    from common.protocol import SessionOpen, SessionSpec, VocabInfo
    from services.admission_scheduler.sessions import SessionEntry

    spec = SessionSpec(sid="s1", mode="wisp", max_new_tokens=10, k_max=6,
                       slo=Slo(ttft_ms=500.0, tpot_ms=20.0))
    entry = SessionEntry("s1", "v", 0.0, spec=spec, prompt_len=30, committed_len=34,
                         server_budget_ms=55.0, tokens_per_round=2.5)
    assert AdmittedSession.of(entry) == AdmittedSession(
        k=6, context_len=34, remaining_tokens=6, slo=spec.slo, server_budget_ms=55.0,
        tokens_per_round=2.5, server_share=None, sid="s1")
    entry.committed_len = 40  # its 10 tokens are out: it asks for no more rounds
    assert AdmittedSession.of(entry) is None
    assert AdmittedSession.of(SessionEntry("s2", "v", 0.0)) is None  # spec not learned yet
    server = SessionSpec(sid="s3", mode="centralized", max_new_tokens=8, k_max=4)
    vocab = VocabInfo(size=100, digest="0123456789abcdef")
    assert Candidate.of(SessionOpen(spec=server, prompt_ids=[1, 2, 3], vocab=vocab)) == \
        Candidate(prompt_len=3, k=4, max_new_tokens=8, slo=None, server_share=1.0)
