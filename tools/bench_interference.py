"""Verification interference through the real services: cold prefills mixed with warm follow-up
rounds, the same arrivals under each batch policy, side by side.

    .venv/bin/python tools/bench_interference.py [--policies fcfs,edf,wisp] [--warm 12]
        [--cold 40] [--cold-prompt 400] [--duration-s 20] [--tpot-slo-ms 0] [--ttft-slo-ms 2000] [--json OUT]

One embedded NATS + Redis; per policy a fresh stack (1 verifier, 1 edge-drafter, admission off,
`--batch-policy` set) and the same workload through the SDK: `--warm` sessions with short
prompts generating long outputs (follow-up rounds, each wanting its TPOT SLO), and `--cold`
requests with long prompts (a prefill of `--cold-prompt` tokens each, few new tokens) arriving at seeded
Poisson times over `--duration-s` — the requests that interfere. All greedy, mode `sled` (fixed
k drafting), so the batch policy is the only difference between runs. With `--tpot-slo-ms 0`
the TPOT SLO is set from a calibration run without cold requests (1.25× its median TPOT).

Reported per policy: SLO violation rate (TTFT and TPOT, DESIGN.md §7) over all requests, warm
and cold; p50/p99 TPOT of the warm requests; the scheduler's per-round deadline misses (from its
`/verifiers` counters) and late dispatches. Every output is also checked against the target's
greedy output. CPU with the shipped tiny pair: the absolute numbers say little about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
import urllib.request

from common.client import Client
from common.logs import configure_logging
from common.models.loading import DEFAULT_TARGET, held_out_prompts, load_model
from common.models.reference import hf_greedy
from services.stack.embedded import EmbeddedInfra
from services.stack.launcher import stack_options, start_stack, stop_stack

WARM_NEW, COLD_NEW = 64, 4


def workload(tokenizer, warm: int, cold: int, duration_s: float, seed: int,
             cold_prompt: int):
    """(warm prompts, cold prompts, cold arrival offsets in s): the same for every policy."""
    by_domain = held_out_prompts(tokenizer, max_tokens=64)
    short = by_domain["code"] + by_domain["prose"]
    corpus = [t for p in held_out_prompts(tokenizer, max_tokens=4096).values()
              for ids in p for t in ids]
    rng = random.Random(seed)
    longs = []
    for _ in range(cold):
        start = rng.randrange(0, max(1, len(corpus) - cold_prompt))
        longs.append((corpus * 2)[start:start + cold_prompt])
    arrivals, t = [], 0.0
    for _ in range(cold):
        t += rng.expovariate(cold / duration_s)
        arrivals.append(min(t, duration_s))
    return [short[i % len(short)] for i in range(warm)], longs, arrivals


async def run(url: str, warm_prompts, cold_prompts, arrivals, slo, refs) -> dict:
    async def one(client: Client, prompt, max_new: int, delay_s: float):
        await asyncio.sleep(delay_s)
        out = await client.generate_text(None, prompt_ids=prompt, max_new_tokens=max_new,
                                         mode="sled", slo=slo)
        return out.token_ids, out.done

    async with Client(url, timeout_s=600) as client:
        started = time.perf_counter()
        # Warm sessions start staggered over the first second and run through the cold ones.
        tasks = [one(client, p, WARM_NEW, 0.05 * i) for i, p in enumerate(warm_prompts)]
        tasks += [one(client, p, COLD_NEW, 1.0 + a) for p, a in zip(cold_prompts, arrivals,
                                                                    strict=True)]
        results = await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - started
    n_warm = len(warm_prompts)
    exact = sum(ids == ref for (ids, _), ref in zip(results, refs, strict=True))

    def met(done) -> bool:
        t = done.timings
        return done.finish_reason != "error" and t.ttft_ms <= slo[0] and t.tpot_ms <= slo[1]

    warm, cold = results[:n_warm], results[n_warm:]
    tpot = sorted(done.timings.tpot_ms for _, done in warm)
    return {
        "requests": len(results), "exact": exact, "wall_s": round(wall_s, 1),
        "violation_rate": round(1 - sum(met(d) for _, d in results) / len(results), 4),
        "warm_violation_rate": round(1 - sum(met(d) for _, d in warm) / max(1, len(warm)), 4),
        "cold_violation_rate": round(1 - sum(met(d) for _, d in cold) / max(1, len(cold)), 4),
        "warm_tpot_p50_ms": round(statistics.median(tpot), 2),
        "warm_tpot_p99_ms": round(tpot[min(len(tpot) - 1, round(0.99 * (len(tpot) - 1)))], 2),
        "cold_ttft_p50_ms": round(statistics.median(d.timings.ttft_ms for _, d in cold), 1)
        if cold else None,
    }


def scheduler_counters(stack) -> dict:
    svc = next(s for s in stack.services if s.module == "services.admission_scheduler")
    with urllib.request.urlopen(f"{svc.url}/verifiers", timeout=5) as resp:
        counters = json.load(resp)["counters"]
    met, missed = counters.get("deadlines_met", 0), counters.get("deadlines_missed", 0)
    return {"round_deadlines_missed": missed,
            "round_miss_rate": round(missed / max(1, met + missed), 4),
            "late_dispatched": counters.get("late_dispatched", 0),
            "batches": counters.get("batches_done", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="fcfs,edf,wisp")
    ap.add_argument("--warm", type=int, default=12)
    ap.add_argument("--cold", type=int, default=40)
    ap.add_argument("--cold-prompt", type=int, default=400, help="prompt tokens of a cold one")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=0.0, help="0: from a calibration run")
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    configure_logging("warning")
    target = load_model(DEFAULT_TARGET, device="cpu")
    warm_prompts, cold_prompts, arrivals = workload(target.tokenizer, args.warm, args.cold,
                                                    args.duration_s, args.seed, args.cold_prompt)
    refs = [hf_greedy(target.model, p, n, target.eos_token_id)
            for p, n in [(w, WARM_NEW) for w in warm_prompts]
            + [(c, COLD_NEW) for c in cold_prompts]]
    results: dict[str, dict] = {}
    tpot_slo = args.tpot_slo_ms
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedInfra(os.path.join(tmp, "infra")) as infra:
        def stack_for(policy: str):
            return start_stack(stack_options(
                nats_url=infra.nats_url, redis_url=infra.redis_url, verifiers=1, device="cpu",
                batch_policy=policy, admission="off",
                state_dir=os.path.join(tmp, f"state-{policy}")))

        if tpot_slo <= 0:  # calibration: the warm sessions alone, under FCFS
            stack = stack_for("fcfs")
            try:
                alone = asyncio.run(run(stack.nats_url, warm_prompts, [], [],
                                        (1e9, 1e9), refs[:len(warm_prompts)]))
            finally:
                stop_stack(stack)
            tpot_slo = round(1.25 * alone["warm_tpot_p50_ms"], 1)
            print(f"# calibration (warm sessions alone): TPOT p50 "
                  f"{alone['warm_tpot_p50_ms']} ms -> TPOT SLO {tpot_slo} ms", flush=True)
        slo = (args.ttft_slo_ms, tpot_slo)
        for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
            stack = stack_for(policy)
            try:
                out = asyncio.run(run(stack.nats_url, warm_prompts, cold_prompts, arrivals,
                                      slo, refs))
                out.update(scheduler_counters(stack))
            finally:
                stop_stack(stack)
            results[policy] = out
            print(f"# {policy}: {out}", flush=True)
    config = {"warm": args.warm, "warm_new_tokens": WARM_NEW, "cold": args.cold,
              "cold_prompt_tokens": args.cold_prompt, "cold_new_tokens": COLD_NEW,
              "duration_s": args.duration_s, "slo_ms": {"ttft": slo[0], "tpot": slo[1]},
              "seed": args.seed, "mode": "sled (fixed k), greedy", "verifiers": 1,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU, shipped tiny pair"}
    print(f"\n{args.warm} warm sessions x {WARM_NEW} tokens + {args.cold} cold requests "
          f"({args.cold_prompt}-token prompts, {COLD_NEW} tokens) over {args.duration_s:g} s; "
          f"SLO TTFT {slo[0]:g} ms, TPOT {slo[1]:g} ms; {config['machine']}\n")
    keys = ["violation_rate", "warm_violation_rate", "cold_violation_rate", "warm_tpot_p50_ms",
            "warm_tpot_p99_ms", "cold_ttft_p50_ms", "round_miss_rate", "late_dispatched",
            "batches", "exact", "wall_s"]
    names = list(results)
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        print(f"| {key} | " + " | ".join(str(results[n][key]) for n in names) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
