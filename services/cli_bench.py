"""`wisp bench`: micro-benchmarks of the serving path that need no model or GPU.

    wisp bench scheduler [--pending 1000] [--repeats 200] [--policy wisp|edf|fcfs|all] [--json]

`scheduler` times one batch selection (`BatchPolicy.select`) over a synthetic queue of
`--pending` verify requests: warm rounds and cold prefills with realistic deadlines, a latency
estimator with plausible coefficients and a KV budget. The acceptance target is the wisp
policy's p50 and p99 under 1 ms for 1,000 queued requests (docs/scheduler.md). The `wisp` tool
imports no service's package (docs/architecture.md, "Layers"), so the timing runs in the
scheduler's own entry point, `python -m services.admission_scheduler.simulate select`, in a
process of its own, which also keeps this process's imports out of the timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SELECT_MODULE = "services.admission_scheduler.simulate"


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="micro-benchmarks (no model or GPU needed)")
    what = bench.add_subparsers(dest="bench", required=True)
    sched = what.add_parser("scheduler", help="time one batch selection over a synthetic queue")
    sched.add_argument("--pending", type=int, default=1000, help="queued verify requests")
    sched.add_argument("--repeats", type=int, default=200, help="timed selections per policy")
    sched.add_argument("--policy", default="all", help="wisp | edf | fcfs | all (default all)")
    sched.add_argument("--seed", type=int, default=0)
    sched.add_argument("--json", action="store_true", help="print one JSON object")


def run_select(pending: int, repeats: int, policy: str, seed: int) -> dict:
    """The scheduler's selection benchmark, run in a child process: its JSON report."""
    if pending < 1 or repeats < 1:
        raise ValueError("--pending and --repeats must be >= 1")
    proc = subprocess.run(
        [sys.executable, "-m", SELECT_MODULE, "select", "--pending", str(pending),
         "--repeats", str(repeats), "--policy", policy, "--seed", str(seed)],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        raise RuntimeError(f"the selection benchmark failed: {detail[-1] if detail else proc}")
    return json.loads(proc.stdout)


def cmd_bench(args: argparse.Namespace) -> int:
    report = run_select(args.pending, args.repeats, args.policy, args.seed)
    if args.json:
        print(json.dumps(report))
        return 0
    cfg = report["config"]
    print(f"select() over {cfg['pending']} pending, {cfg['repeats']} repeats (max_batch_size "
          f"{cfg['max_batch_size']}, KV budget {cfg['kv_budget_blocks']} blocks, T̂ = "
          f"{cfg['a']}·N_linear + {cfg['b_compute']}·N_interactions + {cfg['b_read']}·N_cached "
          f"+ {cfg['c']} ms, δ {cfg['guard_ms']} ms)")
    print(f"{'policy':<8}{'p50_ms':>10}{'p99_ms':>10}{'mean_ms':>10}{'max_ms':>10}"
          f"{'batch':>8}{'late':>7}")
    for name, r in report["policies"].items():
        print(f"{name:<8}{r['p50_ms']:>10.4f}{r['p99_ms']:>10.4f}{r['mean_ms']:>10.4f}"
              f"{r['max_ms']:>10.4f}{r['mean_batch_size']:>8.1f}{r['mean_late']:>7.1f}")
    return 0
