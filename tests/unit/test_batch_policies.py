"""The deadline-aware batch policies (edf, wisp) and the rules every policy keeps: one entry per
session, the KV budget, the starvation bound, work conservation; and the fake-clock simulator's
comparison of fcfs, edf and wisp on a mixed cold/warm workload near saturation."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from common.engine.estimator import BatchShape, LatencyEstimator
from common.protocol import VerifyRequest
from services.admission_scheduler.batching import (
    POLICIES,
    FCFSPolicy,
    PendingVerify,
    Selection,
    VerifierState,
    entry_kv_claim,
    kv_claim,
    make_policy,
)
from services.admission_scheduler.deadline_policies import EDFPolicy, WispPolicy
from services.admission_scheduler.simulate import Workload, compare

EST = LatencyEstimator(a=0.02, b_compute=2e-6, b_read=1e-5, c=5.0)
ALL = ("fcfs", "edf", "wisp")


def pending(sid: str, deadline_ms: float, *, k: int = 4, num_new: int | None = None,
            num_cached: int = 500, arrival_ms: float = 0.0, round: int = 0,
            passes: int = 0) -> PendingVerify:
    request = VerifyRequest(sid=sid, round=round, base_len=num_cached + 1, draft_ids=[1] * k,
                            budget_ms=deadline_ms - arrival_ms, draft_ms=1.0, device_id="dev")
    return PendingVerify(request=request, reply_to=f"_INBOX.{sid}", arrival_ms=arrival_ms,
                         deadline_ms=deadline_ms, num_new=k + 1 if num_new is None else num_new,
                         num_cached=num_cached, passes=passes)


def prefill(sid: str, deadline_ms: float, prompt: int = 1500, **kw) -> PendingVerify:
    return pending(sid, deadline_ms, num_new=prompt + 4, num_cached=0, **kw)


def state(*, estimator=EST, budget: int | None = None, block_size: int = 16,
          in_flight: int = 0, guard_ms: float = 1.0) -> VerifierState:
    return VerifierState(verifier_id="v0", block_size=block_size, estimator=estimator,
                         guard_ms=guard_ms, kv_budget_blocks=budget, batches_in_flight=in_flight)


def policy(name: str, **kw) -> object:
    config = SimpleNamespace(max_batch_size=32, max_batch_tokens=8192, starvation_passes=8)
    for key, value in kw.items():
        setattr(config, key, value)
    return make_policy(name, config)


def predicted_ms(entries: list[PendingVerify]) -> float:
    return EST.predict(BatchShape.of([(e.num_new, e.num_cached) for e in entries]))


def random_queue(rng: random.Random, n: int, now: float = 1000.0) -> list[PendingVerify]:
    """Warm rounds and cold prefills, some sessions with two rounds queued, deadlines from long
    past to far ahead, some entries passed over many times already."""
    queue = []
    for i in range(n):
        sid = f"s{rng.randrange(max(1, n * 3 // 4))}"
        deadline = now + rng.uniform(-50.0, 300.0)
        passes = rng.choice([0, 0, 0, 1, 2, 5, 7, 8])
        if rng.random() < 0.2:
            queue.append(prefill(sid, deadline, prompt=rng.randint(200, 1500), round=i,
                                 arrival_ms=now - rng.uniform(0, 50), passes=passes))
        else:
            queue.append(pending(sid, deadline, k=rng.randint(0, 8),
                                 num_cached=rng.randint(1, 1200), round=i,
                                 arrival_ms=now - rng.uniform(0, 50), passes=passes))
    queue.sort(key=lambda e: e.arrival_ms)
    return queue


# -- registry and construction -------------------------------------------------------------------
def test_all_three_policies_are_registered_and_built_from_the_config() -> None:
    assert set(ALL) <= set(POLICIES)
    config = SimpleNamespace(max_batch_size=5, max_batch_tokens=77, starvation_passes=3)
    for name, cls in (("fcfs", FCFSPolicy), ("edf", EDFPolicy), ("wisp", WispPolicy)):
        built = make_policy(name, config)
        assert isinstance(built, cls) and built.name == name
        assert (built.max_batch_size, built.max_batch_tokens) == (5, 77)
    assert make_policy("wisp", config).starvation_passes == 3
    # a config without the field (an older one) gets the default bound
    assert make_policy("edf", SimpleNamespace(max_batch_size=5, max_batch_tokens=7)
                       ).starvation_passes == 8
    with pytest.raises(ValueError):
        EDFPolicy(starvation_passes=0)


# -- edf -----------------------------------------------------------------------------------------
def test_edf_orders_by_deadline_and_breaks_ties_by_arrival() -> None:
    queue = [pending("a", 50.0), pending("b", 20.0), pending("c", 30.0), pending("d", 20.0),
             pending("e", 10.0)]
    chosen = EDFPolicy().select(queue, 0.0, state()).entries
    assert [e.sid for e in chosen] == ["e", "b", "d", "c", "a"]


def test_edf_skips_what_does_not_fit_and_a_later_smaller_entry_takes_the_room() -> None:
    queue = [pending("a", 10.0, k=3), pending("big", 20.0, k=20), pending("a", 25.0, k=1, round=1),
             pending("small", 30.0, k=1)]
    chosen = EDFPolicy(max_batch_tokens=8).select(queue, 0.0, state()).entries
    assert [e.sid for e in chosen] == ["a", "small"]  # big over the tokens, a's 2nd round: sid


def test_edf_caps_the_batch_size() -> None:
    queue = [pending(f"s{i}", float(100 - i)) for i in range(10)]
    chosen = EDFPolicy(max_batch_size=3).select(queue, 0.0, state()).entries
    assert [e.sid for e in chosen] == ["s9", "s8", "s7"]


# -- wisp ----------------------------------------------------------------------------------------
def test_wisp_leaves_out_a_prefill_that_would_make_urgent_rounds_miss() -> None:
    warm = [pending(f"w{i}", 12.0) for i in range(4)]  # T̂ of the four ≈ 5.7 ms: they make it
    cold = prefill("cold", 200.0)  # +34.5 ms: with it none of them would
    queue = [cold, *warm]
    assert predicted_ms(warm) + 1.0 <= 12.0 < predicted_ms(queue)
    chosen = policy("wisp").select(queue, 0.0, state()).entries
    assert [e.sid for e in chosen] == ["w0", "w1", "w2", "w3"]
    assert cold.passes == 1
    # EDF (and FCFS) take everything, and every warm round misses
    assert len(policy("edf").select([prefill("cold", 200.0), *warm], 0.0, state()).entries) == 5


def test_wisp_adds_the_prefill_when_every_deadline_still_holds() -> None:
    warm = [pending(f"w{i}", 60.0) for i in range(4)]
    queue = [prefill("cold", 200.0), *warm]
    assert predicted_ms(queue) + 1.0 <= 60.0
    chosen = policy("wisp").select(queue, 0.0, state()).entries
    assert {e.sid for e in chosen} == {"cold", "w0", "w1", "w2", "w3"}


def test_wisp_takes_urgent_rounds_before_denser_ones_with_time_to_spare() -> None:
    urgent = pending("urgent", 8.0, k=8)  # LST = 8 - T̂ alone - δ ≈ 1.8 ms: now or never
    relaxed = [pending(f"r{i}", 500.0, k=8) for i in range(5)]
    chosen = policy("wisp", max_batch_size=2).select([*relaxed, urgent], 0.0, state()).entries
    assert chosen[0].sid == "urgent"


def test_wisp_fills_by_utility_per_millisecond() -> None:
    # Same deadlines: the cheap warm rounds (many tokens per ms) go before a costly prefill.
    queue = [prefill("cold", 900.0, prompt=400), pending("w0", 900.0), pending("w1", 900.0)]
    chosen = policy("wisp", max_batch_size=2).select(queue, 0.0, state()).entries
    assert [e.sid for e in chosen] == ["w0", "w1"]


def test_wisp_without_an_estimator_is_edf() -> None:
    rng = random.Random(3)
    for _ in range(20):
        queue = random_queue(rng, 40)
        twin = [replace(e) for e in queue]
        got = policy("wisp").select(queue, 1000.0, state(estimator=None, budget=200)).entries
        want = policy("edf").select(twin, 1000.0, state(estimator=None, budget=200)).entries
        assert [e.key for e in got] == [e.key for e in want]


def test_wisp_serves_late_entries_and_counts_them() -> None:
    late = [pending(f"l{i}", -5.0) for i in range(3)]  # already past their deadline
    selection = policy("wisp").select(late, 0.0, state())
    assert selection.entries == late
    assert selection.late == 3
    # next to entries that can still make it, late ones fill the room that is left
    fine = [pending(f"f{i}", 40.0) for i in range(2)]
    selection = policy("wisp").select([*late, *fine], 0.0, state())
    assert [e.sid for e in selection.entries] == ["f0", "f1", "l0", "l1", "l2"]
    assert selection.late == 3


def test_late_counts_past_the_latest_start_time() -> None:
    # LST = deadline - T̂ alone - δ; T̂ alone of a warm round here ≈ 5.11 ms, δ = 1 ms
    entries = [pending("on_time", 6.5), pending("past_lst", 6.0)]
    for name in ALL:
        selection = policy(name).select([replace(e) for e in entries], 0.0, state())
        assert selection.late == 1, name
        assert policy(name).select([replace(e) for e in entries], 0.0,
                                   state(estimator=None)).late == 0, name


def test_wisp_looks_past_the_batches_in_flight() -> None:
    # With a batch in flight this one starts about T_ref (here c = 5 ms) later: a round whose
    # LST (≈ 2.9 ms) is still ahead now is urgent on an idle verifier, but cannot make it
    # behind the batch in flight, so it yields to one that can (and is still served).
    tight, relaxed = pending("tight", 9.0), pending("relaxed", 30.0)
    idle = policy("wisp").select([replace(relaxed), replace(tight)], 0.0, state()).entries
    busy = policy("wisp").select([relaxed, tight], 0.0, state(in_flight=1)).entries
    assert [e.sid for e in idle] == ["tight", "relaxed"]
    assert [e.sid for e in busy] == ["relaxed", "tight"]


# -- rules every policy keeps --------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_random_queues_keep_every_rule(name: str) -> None:
    """One entry per sid, a subset of the queue, the size and token caps, the KV budget (a
    lone over-budget entry only alone and only on an idle verifier), work conservation, and
    the passes of what was left behind."""
    rng = random.Random(7)
    for trial in range(300):
        queue = random_queue(rng, rng.randint(1, 60))
        budget = rng.choice([None, 0, 5, 40, 120, 400])
        in_flight = rng.choice([0, 0, 1])
        verifier = state(budget=budget, in_flight=in_flight,
                         estimator=rng.choice([EST, EST, None]))
        size, tokens = rng.choice([(32, 8192), (4, 20), (8, 64)])
        before = {id(e): e.passes for e in queue}
        chosen = policy(name, max_batch_size=size, max_batch_tokens=tokens).select(
            queue, 1000.0, verifier).entries
        ids = {id(e) for e in chosen}
        assert len(ids) == len(chosen) and ids <= set(before), trial
        assert len({e.sid for e in chosen}) == len(chosen), trial
        assert len(chosen) <= size
        assert len(chosen) == 1 or sum(e.num_tokens for e in chosen) <= tokens
        if budget is not None:
            claim = kv_claim(chosen, verifier.block_size)
            alone = (len(chosen) == 1 and in_flight == 0
                     and entry_kv_claim(chosen[0], verifier.block_size) > budget)
            assert claim <= budget or alone, (trial, claim, budget)
        if in_flight == 0:
            assert chosen, trial  # work-conserving on an idle verifier
        for e in queue:
            assert e.passes == before[id(e)] + (bool(chosen) and id(e) not in ids)


@pytest.mark.parametrize("name", ALL)
def test_an_over_budget_request_goes_alone_when_idle_and_waits_otherwise(name: str) -> None:
    huge = prefill("huge", 45.0, prompt=1500)  # 94 blocks of 16; urgent: first in every order
    small = pending("small", 200.0)
    assert entry_kv_claim(huge, 16) > 50
    idle = policy(name).select([huge, small], 0.0, state(budget=50)).entries
    busy = policy(name).select([huge, small], 0.0, state(budget=50, in_flight=1)).entries
    assert idle == [huge]
    assert huge not in busy
    if name != "fcfs":  # FCFS lets nothing overtake it: it holds the queue
        assert busy == [small]


@pytest.mark.parametrize("name", ALL)
def test_empty_queue_and_no_selection_leave_passes_alone(name: str) -> None:
    assert policy(name).select([], 0.0, state()).entries == []
    held = prefill("huge", 100.0)
    assert policy(name).select([held], 0.0, state(budget=10, in_flight=1)) == Selection([])
    assert held.passes == 0


# -- the starvation bound ------------------------------------------------------------------------
def run_stream(name: str, queue: list[PendingVerify], batches: int, *, per_batch: int = 6,
               slack_ms: float = 20.0, budget: int | None = None, **kw) -> dict:
    """Dispatch `batches` batches on a fake clock while `per_batch` urgent warm rounds (deadline
    `slack_ms` ahead) arrive with each: the adversary of everything that is not urgent. Returns
    the most passes seen and when each of the initial entries ran."""
    pol = policy(name, **kw)
    now, most, ran = 0.0, 0, {}
    watched = {e.sid for e in queue}
    for b in range(batches):
        queue.extend(pending(f"w{b}.{j}", now + slack_ms, num_cached=300 + j)
                     for j in range(per_batch))
        chosen = pol.select(queue, now, state(budget=budget)).entries
        assert chosen
        most = max([most, *(e.passes for e in queue)])
        for e in chosen:
            if e.sid in watched:
                ran[e.sid] = b
        ids = {id(e) for e in chosen}
        queue[:] = [e for e in queue if id(e) not in ids]
        now += predicted_ms(chosen)
    return {"max_passes": most, "ran": ran}


def test_without_the_bound_wisp_would_starve_a_prefill_forever() -> None:
    out = run_stream("wisp", [prefill("cold", 10_000.0)], 60, starvation_passes=10_000)
    assert "cold" not in out["ran"]  # never feasible next to the urgent stream
    assert out["max_passes"] >= 59


@pytest.mark.parametrize("name", ALL)
def test_no_entry_is_passed_over_more_than_starvation_passes(name: str) -> None:
    out = run_stream(name, [prefill("cold", 10_000.0)], 60)
    assert out["max_passes"] <= 8
    assert out["ran"]["cold"] <= 8


@pytest.mark.parametrize("name", ["edf", "wisp"])
def test_the_bound_holds_for_prefills_that_cannot_share_a_kv_budget(name: str) -> None:
    # Three prefills of 94 blocks reach the bound together, but a budget of 128 blocks takes
    # one per batch: the look-ahead sends the later ones earlier so none waits past the bound.
    cold = [prefill(f"cold{i}", 10_000.0) for i in range(3)]
    out = run_stream(name, cold, 40, budget=128)
    assert out["max_passes"] <= 8
    assert sorted(out["ran"]) == ["cold0", "cold1", "cold2"]
    assert max(out["ran"].values()) <= 8


# -- the simulator -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wisp_meets_more_deadlines_than_fcfs_and_edf_near_saturation(seed: int) -> None:
    w = Workload(seed=seed, duration_ms=10_000.0)
    reports = compare(w)
    fcfs, edf, wisp = reports["fcfs"], reports["edf"], reports["wisp"]
    assert fcfs.rounds == edf.rounds == wisp.rounds > 2000  # every round ran, under each
    assert fcfs.cold > 100 and fcfs.warm > 1000  # a mix
    assert 0.8 <= fcfs.utilisation <= 0.95  # near saturation
    assert wisp.met > fcfs.met and wisp.met > edf.met
    assert wisp.violation_rate < 0.5 * min(fcfs.violation_rate, edf.violation_rate)
    for r in reports.values():
        assert r.max_passes <= w.starvation_passes, r.policy
        assert r.max_kv_claim <= w.kv_budget_blocks, r.policy


def test_the_simulation_is_deterministic() -> None:
    w = Workload(seed=5, duration_ms=3_000.0)
    first, again = compare(w, ("wisp",)), compare(w, ("wisp",))
    assert first["wisp"].summary() == again["wisp"].summary()


# -- wisp bench scheduler ------------------------------------------------------------------------
def test_bench_scheduler_json(capsys) -> None:
    from services.cli import main

    assert main(["bench", "scheduler", "--pending", "200", "--repeats", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "wisp"
    assert out["p50_ms"] > 0 and out["p99_ms"] >= out["p50_ms"]
    assert set(out["policies"]) == set(POLICIES)
    assert out["config"]["pending"] == 200
    for numbers in out["policies"].values():
        assert numbers["mean_batch_size"] >= 1
