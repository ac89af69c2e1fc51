"""A fake-clock discrete-event simulation of one verifier behind a batch policy.

Sessions open at random times (a Poisson stream), each with a cold prefill (the whole prompt,
deadline: its TTFT SLO) and then warm rounds (k drafted tokens over the cached context,
deadline: ``(k+1)·TPOT`` from the start of drafting). A session is a closed loop: its next round
arrives a downlink, a drafting time and an uplink after its previous round is done. The verifier
runs one batch at a time; a batch's true time is a "true" `LatencyEstimator` times seeded
log-normal noise, and the policy sees an `OnlineEstimator` refined from those times (its guard δ
included), as the scheduler does. The policy is asked whenever the verifier is free, on every
arrival while it is free, and at the selection's ``wake_at_ms``.

Every policy sees the same sessions (open times, prompts, draft lengths, acceptances, network
delays: drawn from the seed up front) and the same noise per batch index, so their counts compare.

    python -m services.admission_scheduler.simulate [--seed 0] [--policies fcfs,edf,wisp]

prints the workload and a table of deadlines met, p50/p99 residence, passes and KV per policy.

    python -m services.admission_scheduler.simulate select [--pending 1000] [--repeats 200]

times one selection (`BatchPolicy.select`) over a synthetic queue snapshot and prints one JSON
object: what `wisp bench scheduler` runs (the `wisp` tool may not import a service's package).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from common.engine.estimator import BatchShape, LatencyEstimator, OnlineEstimator
from common.protocol import BatchDone, Slo, VerifyRequest
from services.admission_scheduler.batching import (
    POLICIES,
    PendingVerify,
    VerifierState,
    kv_claim,
    make_policy,
)

__all__ = ["PolicyReport", "Round", "SelectBench", "SessionScript", "Workload", "bench_select",
           "compare", "scripts", "select_report", "simulate", "synthetic_queue"]


@dataclass(frozen=True, slots=True)
class Workload:
    """A mixed cold/warm workload near saturation (defaults: the verifier is busy ~90% of the
    time under FCFS; see docs/scheduler.md)."""

    seed: int = 0
    duration_ms: float = 20_000.0  # sessions open within it; the run ends when all are done
    sessions_per_s: float = 18.0
    rounds: tuple[int, int] = (8, 24)  # warm rounds per session (after the cold prefill)
    prompt_tokens: tuple[int, int] = (200, 1500)
    draft_tokens: tuple[int, int] = (4, 8)
    acceptance: float = 0.75  # per drafted token; a round commits its accepted prefix + 1
    ttft_ms: float = 300.0
    tpot_ms: float = 12.0
    draft_ms_per_token: float = 3.0
    network_ms: tuple[float, float] = (3.0, 12.0)  # one way, drawn per message
    # The verifier's true batch time: T̂ of these coefficients × log-normal noise.
    a: float = 0.02
    b_compute: float = 2e-6
    b_read: float = 1e-5
    c: float = 5.0
    noise: float = 0.05  # σ of the log-normal factor
    estimator_bias: float = 0.0  # the policy's prior = true × (1 + this)
    block_size: int = 16
    kv_budget_blocks: int = 128  # a prefill of 1500 tokens takes 94
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    starvation_passes: int = 8

    def true_estimator(self) -> LatencyEstimator:
        return LatencyEstimator(self.a, self.b_compute, self.b_read, self.c)

    def prior(self) -> LatencyEstimator:
        s = 1.0 + self.estimator_bias
        return LatencyEstimator(self.a * s, self.b_compute * s, self.b_read * s, self.c * s)


@dataclass(frozen=True, slots=True)
class Round:
    k: int  # drafted tokens
    committed: int  # tokens the round commits (accepted prefix + bonus)
    uplink_ms: float
    downlink_ms: float


@dataclass(frozen=True, slots=True)
class SessionScript:
    sid: str
    open_ms: float
    prompt: int
    rounds: tuple[Round, ...]  # the first is the cold prefill


def scripts(w: Workload) -> list[SessionScript]:
    """The sessions of `w`, drawn from its seed alone (every policy replays the same ones)."""
    rng = random.Random(w.seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(w.sessions_per_s / 1e3)
        if t >= w.duration_ms:
            return out
        rounds = []
        for _ in range(1 + rng.randint(*w.rounds)):
            k = rng.randint(*w.draft_tokens)
            accepted = next((j for j in range(k) if rng.random() >= w.acceptance), k)
            rounds.append(Round(k, accepted + 1, rng.uniform(*w.network_ms),
                                rng.uniform(*w.network_ms)))
        out.append(SessionScript(f"s{len(out)}", t, rng.randint(*w.prompt_tokens),
                                 tuple(rounds)))


@dataclass(slots=True)
class PolicyReport:
    policy: str
    rounds: int = 0
    met: int = 0
    missed: int = 0
    cold_met: int = 0
    cold: int = 0
    warm_met: int = 0
    warm: int = 0
    late_dispatched: int = 0  # entries the policy said were past their LST when it sent them
    p50_ms: float = 0.0  # arrival to done
    p99_ms: float = 0.0
    max_passes: int = 0
    max_kv_claim: int = 0
    kv_budget: int = 0
    batches: int = 0
    mean_batch: float = 0.0
    utilisation: float = 0.0  # busy time / time from the first session's open to the end
    residence_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def violation_rate(self) -> float:
        return self.missed / self.rounds if self.rounds else 0.0

    def summary(self) -> dict[str, float | int | str]:
        out = {k: v for k, v in asdict(self).items() if k != "residence_ms"}
        out["violation_rate"] = round(self.violation_rate, 4)
        return out


@dataclass(slots=True)
class _Session:
    script: SessionScript
    next_round: int = 0
    context: int = 0  # committed tokens (prompt + generated)


def simulate(policy_name: str, w: Workload,
             sessions: list[SessionScript] | None = None) -> PolicyReport:
    """Run `w` (or the given `sessions`) through policy `policy_name`."""
    sessions = scripts(w) if sessions is None else sessions
    policy = make_policy(policy_name, w)
    truth = w.true_estimator()
    online = OnlineEstimator(w.prior())
    noise = random.Random(w.seed + 1)
    slo = Slo(ttft_ms=w.ttft_ms, tpot_ms=w.tpot_ms)
    report = PolicyReport(policy=policy_name, kv_budget=w.kv_budget_blocks)
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    queue: list[PendingVerify] = []
    live = {s.sid: _Session(s) for s in sessions}
    busy_until: float | None = None  # end of the batch running, None: idle
    last_done: BatchDone | None = None
    busy_ms = 0.0

    def submit(sess: _Session, now: float) -> None:
        script, rnd = sess.script, sess.script.rounds[sess.next_round]
        draft_ms = rnd.k * w.draft_ms_per_token
        arrival = now + draft_ms + rnd.uplink_ms
        if sess.next_round == 0:
            num_new, num_cached = script.prompt + rnd.k, 0
            deadline = now + w.ttft_ms - rnd.downlink_ms
        else:
            num_new, num_cached = rnd.k + 1, sess.context - 1
            deadline = now + (rnd.k + 1) * w.tpot_ms - rnd.downlink_ms
        request = VerifyRequest(sid=script.sid, round=sess.next_round, base_len=sess.context,
                                draft_ids=[0] * rnd.k, budget_ms=deadline - arrival,
                                draft_ms=draft_ms, device_id=script.sid)
        entry = PendingVerify(request=request, reply_to=script.sid, arrival_ms=arrival,
                              deadline_ms=deadline, slo=slo, num_new=num_new,
                              num_cached=num_cached)
        heapq.heappush(events, (arrival, next(seq), "arrive", entry))

    for s in live.values():
        heapq.heappush(events, (s.script.open_ms, next(seq), "open", s))

    def dispatch(now: float) -> None:
        nonlocal busy_until, busy_ms
        if busy_until is not None or not queue:
            return
        state = VerifierState(verifier_id="v0", block_size=w.block_size,
                              free_blocks=w.kv_budget_blocks, total_blocks=w.kv_budget_blocks,
                              recent_done=(last_done,) if last_done else (),
                              estimator=online.current, guard_ms=online.guard_ms,
                              kv_budget_blocks=w.kv_budget_blocks)
        selection = policy.select(queue, now, state)
        chosen = selection.entries
        if not chosen:
            if selection.wake_at_ms is not None:
                heapq.heappush(events, (max(now, selection.wake_at_ms), next(seq), "wake", None))
            return
        ids = {id(e) for e in chosen}
        queue[:] = [e for e in queue if id(e) not in ids]
        shape = BatchShape.of([(e.num_new, e.num_cached) for e in chosen])
        took = truth.predict(shape) * math.exp(noise.gauss(0.0, w.noise))
        busy_until = now + took
        busy_ms += took
        report.batches += 1
        report.mean_batch += len(chosen)
        report.late_dispatched += selection.late
        report.max_passes = max(report.max_passes, max(e.passes for e in chosen))
        report.max_kv_claim = max(report.max_kv_claim, kv_claim(chosen, w.block_size))
        heapq.heappush(events, (busy_until, next(seq), "done", (chosen, shape, took)))

    end_ms = 0.0
    while events:
        now, _, kind, data = heapq.heappop(events)
        end_ms = now
        if kind == "open":
            submit(data, now)
        elif kind == "arrive":
            queue.append(data)
        elif kind == "done":
            chosen, shape, took = data
            busy_until = None
            online.observe(shape, took)
            last_done = BatchDone(verifier_id="v0", batch_id=str(report.batches),
                                  batch_ms=took, size=len(chosen),
                                  num_linear=shape.num_linear,
                                  num_interactions=shape.num_interactions,
                                  num_cached=shape.num_cached)
            for e in chosen:
                _record(report, e, now)
                sess = live[e.sid]
                rnd = sess.script.rounds[sess.next_round]
                before = sess.script.prompt if sess.next_round == 0 else sess.context
                sess.context = before + rnd.committed
                sess.next_round += 1
                if sess.next_round < len(sess.script.rounds):
                    # the edge hears of it a downlink later and drafts the next round from there
                    submit(sess, now + rnd.downlink_ms)
        dispatch(now)
    if queue:
        raise RuntimeError(f"{policy_name}: {len(queue)} requests never ran")
    report.mean_batch = report.mean_batch / report.batches if report.batches else 0.0
    if sessions and end_ms > sessions[0].open_ms:
        report.utilisation = busy_ms / (end_ms - sessions[0].open_ms)
    times = sorted(report.residence_ms)
    if times:
        report.p50_ms = times[len(times) // 2]
        report.p99_ms = times[min(len(times) - 1, int(0.99 * len(times)))]
    return report


def _record(report: PolicyReport, entry: PendingVerify, done_ms: float) -> None:
    met = done_ms <= entry.deadline_ms
    cold = entry.request.round == 0
    report.rounds += 1
    report.met += met
    report.missed += not met
    report.cold += cold
    report.cold_met += cold and met
    report.warm += not cold
    report.warm_met += (not cold) and met
    report.residence_ms.append(done_ms - entry.arrival_ms)


def compare(w: Workload, policies: tuple[str, ...] = ("fcfs", "edf", "wisp"),
            ) -> dict[str, PolicyReport]:
    """Every policy on the same sessions of `w`."""
    sessions = scripts(w)
    return {name: simulate(name, w, sessions) for name in policies}


_COLUMNS = (("met", "met", "d"), ("missed", "missed", "d"), ("violation", "violation_rate", ".2%"),
            ("cold met", "cold_met", "d"), ("warm met", "warm_met", "d"),
            ("p50 ms", "p50_ms", ".1f"), ("p99 ms", "p99_ms", ".1f"),
            ("max passes", "max_passes", "d"), ("max KV", "max_kv_claim", "d"),
            ("late sent", "late_dispatched", "d"), ("batches", "batches", "d"),
            ("mean batch", "mean_batch", ".1f"), ("busy", "utilisation", ".1%"))


def format_table(w: Workload, reports: dict[str, PolicyReport]) -> str:
    first = next(iter(reports.values()))
    lines = [f"workload: seed {w.seed}, {w.sessions_per_s:g} sessions/s over "
             f"{w.duration_ms / 1e3:g} s, {w.rounds[0]}-{w.rounds[1]} warm rounds each, prompts "
             f"{w.prompt_tokens[0]}-{w.prompt_tokens[1]} tokens, k {w.draft_tokens[0]}-"
             f"{w.draft_tokens[1]}, TTFT {w.ttft_ms:g} ms, TPOT {w.tpot_ms:g} ms, network "
             f"{w.network_ms[0]:g}-{w.network_ms[1]:g} ms one way",
             f"verifier: T = {w.a:g}·N_linear + {w.b_compute:g}·N_interactions + "
             f"{w.b_read:g}·N_cached + {w.c:g} ms × lognormal(σ {w.noise:g}); KV budget "
             f"{w.kv_budget_blocks} blocks of {w.block_size}; max batch {w.max_batch_size}; "
             f"starvation_passes {w.starvation_passes}",
             f"requests: {first.rounds} ({first.cold} cold, {first.warm} warm)", ""]
    width = max(12, *(len(n) + 2 for n in reports))
    lines.append(f"{'':<12}" + "".join(f"{name:>{width}}" for name in reports))
    for label, attr, fmt in _COLUMNS:
        cells = []
        for r in reports.values():
            value = r.violation_rate if attr == "violation_rate" else getattr(r, attr)
            cells.append(f"{value:>{width}{fmt}}")
        lines.append(f"{label:<12}" + "".join(cells))
    return "\n".join(lines)


# -- one selection over a synthetic queue (`wisp bench scheduler`) -------------------------------
SELECT_NOW_MS = 1_000_000.0
SELECT_QUEUES = 8  # distinct queues the timed repeats cycle through


@dataclass(frozen=True, slots=True)
class SelectBench:
    """A queue snapshot to time `BatchPolicy.select` on: `pending` queued requests, a plausible
    estimator, guard and KV budget."""

    pending: int = 1000
    repeats: int = 200
    seed: int = 0
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    starvation_passes: int = 8
    cold_share: float = 0.15  # of the queued requests, cold prefills (prompt 200-1500 tokens)
    ttft_ms: float = 600.0
    tpot_ms: float = 40.0
    draft_ms_per_token: float = 6.0
    a: float = 0.02
    b_compute: float = 2e-6
    b_read: float = 1e-5
    c: float = 5.0
    guard_ms: float = 2.0
    block_size: int = 16
    kv_budget_blocks: int = 512


def synthetic_queue(b: SelectBench, rng: random.Random) -> list[PendingVerify]:
    """`b.pending` queued requests in arrival order, waiting 0-300 ms so far: warm rounds (4-8
    drafted tokens over 100-1000 cached ones, deadline (k+1)·TPOT less the drafting) and cold
    prefills (the whole prompt, deadline TTFT); a few second rounds of a session and a few
    requests passed over up to the starvation bound."""
    slo = Slo(ttft_ms=b.ttft_ms, tpot_ms=b.tpot_ms)
    entries = []
    for i in range(b.pending):
        arrival = SELECT_NOW_MS - rng.uniform(0.0, 300.0)
        k = rng.randint(4, 8)
        if rng.random() < b.cold_share:
            num_new, num_cached = rng.randint(200, 1500) + k, 0
            deadline = arrival + b.ttft_ms
        else:
            num_new, num_cached = k + 1, rng.randint(100, 1000)
            deadline = arrival + (k + 1) * b.tpot_ms - k * b.draft_ms_per_token
        sid = f"s{i - 1}" if i and rng.random() < 0.02 else f"s{i}"
        request = VerifyRequest(sid=sid, round=i, base_len=num_cached + 1, draft_ids=[1] * k,
                                budget_ms=deadline - arrival, draft_ms=k * b.draft_ms_per_token,
                                device_id="bench")
        passes = b.starvation_passes if rng.random() < 0.01 else rng.randint(0, 3)
        entries.append(PendingVerify(request=request, reply_to=f"_INBOX.{sid}",
                                     arrival_ms=arrival, deadline_ms=deadline, slo=slo,
                                     num_new=num_new, num_cached=num_cached, passes=passes))
    entries.sort(key=lambda e: e.arrival_ms)
    return entries


def bench_select(name: str, b: SelectBench) -> dict[str, float]:
    """Time `b.repeats` selections of policy `name` (perf_counter, ms), each on one of
    `SELECT_QUEUES` queues with its passes reset (select counts them on what it leaves)."""
    policy = make_policy(name, b)
    last = BatchDone(verifier_id="v0", batch_id="b0", batch_ms=12.0, size=32,
                     num_linear=32 * 7, num_interactions=32 * 7 * 560, num_cached=32 * 550)
    state = VerifierState(verifier_id="v0", block_size=b.block_size,
                          free_blocks=b.kv_budget_blocks, total_blocks=4 * b.kv_budget_blocks,
                          recent_done=(last,), guard_ms=b.guard_ms,
                          estimator=LatencyEstimator(b.a, b.b_compute, b.b_read, b.c),
                          kv_budget_blocks=b.kv_budget_blocks)
    rng = random.Random(b.seed)
    queues = [synthetic_queue(b, rng) for _ in range(SELECT_QUEUES)]
    passes = [[e.passes for e in q] for q in queues]
    gc.collect()  # the garbage of building the queues is not the policy's to collect
    times, sizes, late = [], [], []
    for repeat in range(b.repeats):
        queue = queues[repeat % SELECT_QUEUES]
        for entry, p in zip(queue, passes[repeat % SELECT_QUEUES], strict=True):
            entry.passes = p
        t0 = time.perf_counter()
        selection = policy.select(queue, SELECT_NOW_MS, state)
        times.append((time.perf_counter() - t0) * 1e3)
        sizes.append(len(selection.entries))
        late.append(selection.late)
    times.sort()
    return {"p50_ms": round(_quantile(times, 0.5), 4), "p99_ms": round(_quantile(times, 0.99), 4),
            "mean_ms": round(sum(times) / len(times), 4), "max_ms": round(times[-1], 4),
            "mean_batch_size": round(sum(sizes) / len(sizes), 2),
            "mean_late": round(sum(late) / len(late), 2)}


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def select_report(b: SelectBench, names: list[str]) -> dict:
    """`bench_select` of each policy in `names`, headed by wisp's (or the one asked for)."""
    results = {name: bench_select(name, b) for name in names}
    head = "wisp" if "wisp" in results else names[0]
    return {"policy": head, "p50_ms": results[head]["p50_ms"],
            "p99_ms": results[head]["p99_ms"], "policies": results, "config": asdict(b)}


def _main_select(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.admission_scheduler.simulate select",
                                     description="time one batch selection over a synthetic queue")
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--policy", default="all", choices=[*sorted(POLICIES), "all"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pending < 1 or args.repeats < 1:
        parser.error("--pending and --repeats must be >= 1")
    b = SelectBench(pending=args.pending, repeats=args.repeats, seed=args.seed)
    names = sorted(POLICIES) if args.policy == "all" else [args.policy]
    print(json.dumps(select_report(b, names)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``select ...``: `_main_select` (one JSON object); anything else: the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["select"]:
        return _main_select(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m services.admission_scheduler.simulate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="fcfs,edf,wisp")
    parser.add_argument("--sessions-per-s", type=float, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    w = Workload(seed=args.seed)
    if args.sessions_per_s is not None:
        w = replace(w, sessions_per_s=args.sessions_per_s)
    if args.duration_s is not None:
        w = replace(w, duration_ms=args.duration_s * 1e3)
    reports = compare(w, tuple(p for p in args.policies.split(",") if p))
    if args.json:
        print(json.dumps({"workload": asdict(w),
                          "policies": {n: r.summary() for n, r in reports.items()}}))
    else:
        print(format_table(w, reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
