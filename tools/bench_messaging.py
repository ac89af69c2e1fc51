"""Messaging overhead of one round (NATS + msgpack + Redis) on loopback vs the round's compute.

    .venv/bin/python tools/bench_messaging.py [--rounds 200]

Measured side by side in one run:
- msgpack: encode + decode of a VerifyRequest and its VerifyResult;
- NATS: request/reply of a VerifyRequest-sized payload to an echo responder;
- Redis: the round's atomic commit (Lua) on a real redis-server;
- a full round through the real admission-scheduler and gpu-verifier processes (shipped tiny
  target on this CPU), as the edge sees it, against the verifier's own batch time;
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
from common.subjects import SESSION_OPEN, VERIFY_SUBMIT
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
    await server.flush()  # the subscription must reach the server before the first request
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


async def bench_service_round(stack, k: int, n: int, target) -> dict[str, float]:
    nc = await nats.connect(stack.nats_url)
    gen = torch.Generator().manual_seed(0)
    vocab = target.vocab_size
    prompt = torch.randint(0, vocab, (CONTEXT,), generator=gen).tolist()
    spec = wire.SessionSpec(sid=wire.new_sid(), mode="sled", max_new_tokens=n * (k + 1) + 8,
                            device_id="bench", k_max=max(k, 1))
    opened = wire.decode_reply(wire.SessionOpened, (await nc.request(SESSION_OPEN, wire.encode(
        wire.SessionOpen(spec=spec, prompt_ids=prompt, vocab=target.vocab_info)),
        timeout=30)).data)
    base, rtts, batch_ms = CONTEXT, [], []
    for r in range(n + 1):
        draft = torch.randint(0, vocab, (k,), generator=gen).tolist()
        req = wire.VerifyRequest(sid=opened.sid, round=r, base_len=base, draft_ids=draft,
                                 budget_ms=10_000.0, draft_ms=0.0, device_id="bench")
        t = time.perf_counter()
        msg = await nc.request(VERIFY_SUBMIT, wire.encode(req), timeout=30)
        rtt = time.perf_counter() - t
        res = wire.decode_reply(wire.VerifyResult, msg.data)
        base = res.committed_len
        if r:  # round 0 is the cold prefill
            rtts.append(rtt)
            batch_ms.append(res.batch_ms)
    await nc.close()
    return {"rtt": med_us(rtts), "batch": statistics.median(batch_ms) * 1e3}


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
                service = await bench_service_round(stack, k, args.rounds, target)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--k", type=int, nargs="+", default=[0, 4, 8])
    args = ap.parse_args()
    configure_logging("warning")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
