"""Messaging overhead of one round (NATS + msgpack + Redis) on loopback vs the round's compute.

    .venv/bin/python tools/bench_messaging.py [--rounds 200] [--k 0 4 8] [--no-spies]

Measured side by side in one run:
- msgpack: encode + decode of a VerifyRequest and its VerifyResult;
- NATS: request/reply of a VerifyRequest-sized payload to an echo responder;
- Redis: the round's atomic commit (Lua) on a real redis-server;
- a full round through the real admission-scheduler and gpu-verifier processes (shipped tiny
  target on this CPU), as the edge sees it, against the verifier's own batch time;
- where that round's time goes, seen from outside the services: the benchmark also subscribes
  to the submit subject, the verifier's batch subject and its done subject (NATS fans every
  message out to each subscriber; the submit copy does not join the scheduler's queue group),
  and timestamps submit published -> submit seen -> batch seen -> done seen -> reply seen on
  one clock, next to the verifier's own queue_ms and batch_ms from the VerifyResult (medians
  and p90 over the rounds; a segment's median is not a difference of medians);
- compute: the same round's verify in-process (VerifierCore) and k draft steps (DrafterCore).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time

import nats
import torch

from common import protocol as wire
from common.engine.drafter import DrafterCore
from common.engine.policies import FixedK
from common.engine.verifier import VerifierCore
from common.logs import configure_logging
from common.models.loading import load_pair
from common.models.runner_factory import make_runner
from common.store import SessionRecord, SessionStore
from common.subjects import SESSION_OPEN, VERIFY_SUBMIT, verifier_batch, verifier_done
from common.transport.service import connect_redis
from services.stack.embedded import EmbeddedInfra
from services.stack.launcher import stack_options, start_stack, stop_stack

CONTEXT = 128  # prompt tokens of the benchmark session


def med_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def atimed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def sample_request(k: int, sid: str = "0" * 32) -> tuple[wire.VerifyRequest, wire.VerifyResult]:
    req = wire.VerifyRequest(sid=sid, round=7, base_len=CONTEXT, draft_ids=list(range(k)),
                             budget_ms=100.0, draft_ms=3.0, device_id="bench")
    res = wire.VerifyResult(sid=sid, round=7, num_drafted=k, num_accepted=k // 2,
                            new_tokens=list(range(k // 2 + 1)), committed_len=CONTEXT + k,
                            finished=False, queue_ms=0.1, batch_ms=5.0, batch_size=1)
    return req, res


async def flush_subscriptions(nc) -> None:
    """Make the SUBs just sent reach the server before going on. nats-py 2.16's flush() writes
    its PING straight to the socket, ahead of commands still waiting for the flusher task (a
    SUB just sent), so its PONG may come back before the server has the subscription (about 1
    in 20 here: a NoRespondersError on the first request). Yielding once lets the flusher
    write them first."""
    await asyncio.sleep(0)
    await nc.flush()


async def bench_transport(infra: EmbeddedInfra, k: int, n: int) -> dict[str, float]:
    req, res = sample_request(k)
    codec = timed(lambda: (wire.decode(wire.VerifyRequest, wire.encode(req)),
                           wire.decode(wire.VerifyResult, wire.encode(res))), n)
    server = await nats.connect(infra.nats_url)
    client = await nats.connect(infra.nats_url)
    reply = wire.encode(res)

    async def echo(msg):
        await msg.respond(reply)

    await server.subscribe("bench.echo", cb=echo)
    await flush_subscriptions(server)  # the echo must be subscribed before the first request
    payload = wire.encode(req)
    rr = await atimed(lambda: client.request("bench.echo", payload, timeout=5), n)
    redis = connect_redis(infra.redis_url)
    store = SessionStore(redis)
    await store.create(SessionRecord(
        spec=wire.SessionSpec(sid="b" * 32, mode="sled", max_new_tokens=10**6),
        prompt_len=CONTEXT, tokens=list(range(CONTEXT))))
    rounds = iter(range(10**9))
    blob = wire.encode(res)

    async def commit():
        r = next(rounds)
        status, length = await store.commit_round("b" * 32, r, CONTEXT + r * 2, [1, 2], blob,
                                                  False)
        assert status.name == "APPLIED", status

    commits = await atimed(commit, n)
    await redis.aclose()
    await server.close()
    await client.close()
    return {"codec": med_us(codec), "nats": med_us(rr), "redis": med_us(commits)}


# The segments of one round through the services, in microseconds (see `bench_service_round`).
SEGMENTS = (
    ("total", "round as the edge sees it (submit published -> reply seen)"),
    ("sched", "scheduler share (submit published -> batch seen)"),
    ("submit_hop", "  of which NATS edge -> scheduler (submit published -> its copy seen)"),
    ("sched_in", "  of which scheduler handling + NATS hop to verifier (submit seen -> batch seen)"),
    ("verifier", "verifier wait + forward (batch seen -> done seen)"),
    ("queue", "  of which verifier queue_ms (batch handler -> worker picks it up)"),
    ("batch", "  of which verifier batch_ms (the forward, to_thread hop included)"),
    ("verifier_rest", "  of which the rest: NATS hops, decode, checks, session check, done encode"),
    ("answer", "commit + reply (done seen -> reply seen)"),
    ("overhead", "residual: total - batch_ms (the messaging overhead)"),
)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_service_round(stack, k: int, n: int, target,
                              spies: bool = True) -> dict[str, float]:
    """`n` warm rounds of one session through the scheduler and verifier, timed from outside:
    the edge RTT, the verifier's batch time, and (with `spies`) each round split at the moments
    the benchmark sees the submit, the batch and the done on the wire (`SEGMENTS`). The spies
    cost the bench process three wake-ups a round on the same CPUs (--no-spies to compare)."""
    nc = await nats.connect(stack.nats_url)
    gen = torch.Generator().manual_seed(0)
    vocab = target.vocab_size
    prompt = torch.randint(0, vocab, (CONTEXT,), generator=gen).tolist()
    spec = wire.SessionSpec(sid=wire.new_sid(), mode="sled", max_new_tokens=n * (k + 1) + 8,
                            device_id="bench", k_max=max(k, 1))
    opened = wire.decode_reply(wire.SessionOpened, (await nc.request(SESSION_OPEN, wire.encode(
        wire.SessionOpen(spec=spec, prompt_ids=prompt, vocab=target.vocab_info)),
        timeout=30)).data)
    # Spies: one clock (perf_counter) for every moment, taken first thing in each callback.
    seen_submit: dict[int, float] = {}
    seen_batch: dict[int, tuple[float, str]] = {}
    seen_done: dict[str, float] = {}

    async def on_submit(msg) -> None:
        t = time.perf_counter()
        req = wire.decode(wire.VerifyRequest, msg.data)
        if req.sid == opened.sid:
            seen_submit[req.round] = t

    async def on_batch(msg) -> None:
        t = time.perf_counter()
        batch = wire.decode(wire.VerifierBatch, msg.data)
        for item in batch.items:
            if item.request.sid == opened.sid:
                seen_batch[item.request.round] = (t, batch.batch_id)

    async def on_done(msg) -> None:
        t = time.perf_counter()
        seen_done[wire.decode(wire.BatchDone, msg.data).batch_id] = t

    subs = [await nc.subscribe(VERIFY_SUBMIT, cb=on_submit),
            await nc.subscribe(verifier_batch(opened.verifier_id), cb=on_batch),
            await nc.subscribe(verifier_done(opened.verifier_id), cb=on_done)] if spies else []
    await flush_subscriptions(nc)  # the spies must be subscribed before the first round
    base = CONTEXT
    seg: dict[str, list[float]] = {name: [] for name, _ in SEGMENTS}
    for r in range(n + 1):
        draft = torch.randint(0, vocab, (k,), generator=gen).tolist()
        req = wire.VerifyRequest(sid=opened.sid, round=r, base_len=base, draft_ids=draft,
                                 budget_ms=10_000.0, draft_ms=0.0, device_id="bench")
        payload = wire.encode(req)
        t = time.perf_counter()
        msg = await nc.request(VERIFY_SUBMIT, payload, timeout=30)
        t_reply = time.perf_counter()
        res = wire.decode_reply(wire.VerifyResult, msg.data)
        base = res.committed_len
        if not r:  # round 0 is the cold prefill
            continue
        ms = 1e-3  # VerifyResult's times are in ms; segments in seconds
        seg["total"].append(t_reply - t)
        seg["queue"].append(res.queue_ms * ms)
        seg["batch"].append(res.batch_ms * ms)
        seg["overhead"].append(t_reply - t - res.batch_ms * ms)
        if not spies:
            continue
        for _ in range(100):  # a spy's message may trail the reply by a loop iteration or two
            if r in seen_submit and r in seen_batch and seen_batch[r][1] in seen_done:
                break
            await asyncio.sleep(0.001)
        t_submit = seen_submit[r]
        t_batch, batch_id = seen_batch[r]
        t_done = seen_done[batch_id]
        seg["sched"].append(t_batch - t)
        seg["submit_hop"].append(t_submit - t)
        seg["sched_in"].append(t_batch - t_submit)
        seg["verifier"].append(t_done - t_batch)
        seg["verifier_rest"].append(t_done - t_batch - (res.queue_ms + res.batch_ms) * ms)
        seg["answer"].append(t_reply - t_done)
    for sub in subs:
        await sub.unsubscribe()
    await nc.close()
    out = {"rtt": med_us(seg["total"]), "batch": med_us(seg["batch"])}
    for name, samples in seg.items():
        if not samples:
            continue
        out[f"{name}.p50"] = med_us(samples)
        out[f"{name}.p90"] = quantile(samples, 0.9) * 1e6
    return out


def bench_compute(k: int, n: int, draft, target) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, target.vocab_size, (CONTEXT,), generator=gen).tolist()
    spec = wire.SessionSpec(sid="s", mode="sled", max_new_tokens=n * (k + 1) + 8,
                            k_max=max(k, 1))
    core = VerifierCore(make_runner(target.model), target.eos_token_id)
    core.open_session(spec, prompt)
    drafter = DrafterCore(make_runner(draft.model), draft.eos_token_id, k_max=max(k, 1))
    drafter.open(spec, prompt, FixedK(k))
    verify, drafting = [], []
    for r in range(n + 1):
        t = time.perf_counter()
        d = drafter.draft(["s"])["s"] if k else None
        t_draft = time.perf_counter() - t
        t = time.perf_counter()
        (out,) = core.verify_batch([wire.VerifyRequest(
            sid="s", round=r, base_len=len(core.committed("s")),
            draft_ids=d.token_ids if d else [], budget_ms=1e3, draft_ms=0.0,
            device_id="bench")])
        t_verify = time.perf_counter() - t
        if k:
            drafter.apply("s", out.result.num_accepted, out.result.new_tokens)
        if r:
            verify.append(t_verify)
            drafting.append(t_draft)
    return {"verify": med_us(verify), "draft": med_us(drafting) if k else 0.0}


async def main_async(args) -> None:
    draft, target = load_pair(device="cpu")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedInfra(os.path.join(tmp, "infra")) as infra:
        stack = start_stack(stack_options(
            nats_url=infra.nats_url, redis_url=infra.redis_url, edges=0, device="cpu",
            state_dir=os.path.join(tmp, "state")))
        try:
            rows = []
            for k in args.k:
                transport = await bench_transport(infra, k, args.rounds)
                service = await bench_service_round(stack, k, args.rounds, target,
                                                    spies=not args.no_spies)
                compute = bench_compute(k, args.rounds, draft, target)
                overhead = service["rtt"] - service["batch"]
                rows.append((k, transport, service, compute, overhead))
        finally:
            stop_stack(stack)
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"CPU fp32; shipped tiny pair; {CONTEXT}-token context; {args.rounds} rounds per row; "
          "medians in microseconds")
    print("\n| k | msgpack enc+dec (req+res) | NATS req/reply | Redis commit | round via "
          "scheduler+verifier (edge RTT) | verifier batch time | messaging overhead (RTT − batch) "
          "| overhead share of RTT | in-process verify | in-process draft of k |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, t, s, c, o in rows:
        print(f"| {k} | {t['codec']:.0f} | {t['nats']:.0f} | {t['redis']:.0f} | {s['rtt']:.0f} | "
              f"{s['batch']:.0f} | {o:.0f} | {o / s['rtt']:.0%} | {c['verify']:.0f} | "
              f"{c['draft']:.0f} |")
    if args.no_spies:
        return
    print("\nWhere a round through the services goes (microseconds; each segment's own median "
          "and p90 over the rounds, so the medians need not add up):\n")
    print("| segment | " + " | ".join(f"k={k} p50 | k={k} p90" for k, *_ in rows) + " |")
    print("|---|" + "---|---|" * len(rows))
    for name, label in SEGMENTS:
        print(f"| {label} | " + " | ".join(
            f"{s[name + '.p50']:.0f} | {s[name + '.p90']:.0f}" for _, _, s, _, _ in rows) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--no-spies", action="store_true",
                    help="time the rounds without subscribing to the submit, batch and done "
                         "subjects (the edge RTT alone; no breakdown)")
    args = ap.parse_args()
    configure_logging("warning")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
