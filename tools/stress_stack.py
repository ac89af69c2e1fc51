"""Many concurrent sessions through the real stack, checked token for token.

    .venv/bin/python tools/stress_stack.py [--sessions 64] [--max-new-tokens 32]
        [--runs sled,centralized,sled@4g]     # mode[@device profile], comma-separated

Starts embedded NATS + Redis and the services (2 verifiers, 1 edge) as `wisp up` does, runs
`--sessions` concurrent greedy generations per run (a mode, optionally with an emulated device
profile) through the SDK, and reports how many equal the target's own greedy output, wall
time, tokens/s, TPOT percentiles, and the drafting accounting from each request's stats
(rounds per request, accepted per round, wasted draft steps and WDT per output token). Not a
capacity benchmark (loadgen is that): a check that concurrency, batching and emulated links
keep output exact, and a side-by-side of the draft-length policies through the services.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from common.client import Client
from common.logs import configure_logging
from common.models.loading import DEFAULT_TARGET, held_out_prompts, load_model
from common.models.reference import hf_greedy
from services.stack.embedded import EmbeddedInfra
from services.stack.launcher import stack_options, start_stack, stop_stack

RUNS = "sled,centralized,sled@4g"


def held_out(tokenizer, n: int) -> list[list[int]]:
    """`n` held-out prompts, cycling through both domains' prompts when n is larger."""
    by_domain = held_out_prompts(tokenizer, max_tokens=96)
    every = by_domain["code"] + by_domain["prose"]
    return [every[i % len(every)] for i in range(n)]


async def run_mode(url: str, prompts, refs, mode: str, profile: str | None,
                   max_new: int) -> str:
    async def one(client: Client, prompt):
        out = await client.generate_text(None, prompt_ids=prompt, max_new_tokens=max_new,
                                         mode=mode, device_profile=profile)
        return out.token_ids, out.done

    async with Client(url, timeout_s=300) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - start
    exact = sum(ids == ref for (ids, _), ref in zip(results, refs, strict=True))
    tpot = sorted(done.timings.tpot_ms for _, done in results)
    tokens = sum(len(ids) for ids, _ in results)
    n = len(prompts)
    stats = [done.stats for _, done in results]
    rounds = sum(s.rounds for s in stats)
    wasted = sum(s.drafted - s.accepted for s in stats)
    wdt_ms = sum(s.wasted_draft_ms for s in stats)
    return (f"| {mode} | {profile or '-'} | {exact}/{n} | {wall:.1f} | {tokens / wall:.0f} | "
            f"{tpot[n // 2]:.1f} | {tpot[int(n * 0.9)]:.1f} | {rounds / n:.1f} | "
            f"{sum(s.accepted for s in stats) / max(rounds, 1):.2f} | "
            f"{wasted / max(tokens, 1):.2f} | {wdt_ms / max(tokens, 1):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--runs", default=RUNS, help=f"mode[@profile],... (default {RUNS})")
    args = ap.parse_args()
    runs = [(m, p or None) for m, _, p in (r.strip().partition("@")
                                           for r in args.runs.split(",") if r.strip())]
    configure_logging("warning")
    target = load_model(DEFAULT_TARGET, device="cpu")
    prompts = held_out(target.tokenizer, args.sessions)
    refs = [hf_greedy(target.model, p, args.max_new_tokens, target.eos_token_id)
            for p in prompts]
    rows = ["| mode | device profile | exact | wall s | tokens/s | TPOT p50 ms | TPOT p90 ms | "
            "rounds/req | accepted/round | wasted/tok | WDT ms/tok |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedInfra(os.path.join(tmp, "infra")) as infra:
        stack = start_stack(stack_options(
            nats_url=infra.nats_url, redis_url=infra.redis_url, verifiers=2, device="cpu",
            state_dir=os.path.join(tmp, "state")))
        try:
            for mode, profile in runs:
                rows.append(asyncio.run(run_mode(stack.nats_url, prompts, refs, mode, profile,
                                                 args.max_new_tokens)))
        finally:
            stop_stack(stack)
    print(f"{args.sessions} concurrent sessions, {args.max_new_tokens} new tokens each, greedy, "
          "2 verifiers + 1 edge-drafter on this machine\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
