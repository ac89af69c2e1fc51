"""`loadgen capacity`: per mode, the highest load with SLO attainment >= 90 %, side by side.

One workload, one machine, the same SLOs for every mode. Without `--nats-url` each mode gets its
own embedded stack (one NATS + Redis for the run, a fresh set of services per mode: 1 verifier,
1 edge-drafter, the scheduler's batch policy by mode as `wisp up` sets it), so no mode inherits
another's warm caches or queues. Each probed load is replayed `--repeats` times; the search and
its bracket are in `loadgen.capacity`. Writes `capacity.json`, `capacity.md`, `vs_load.png`
(attainment and goodput against the offered load per mode, with the repeats' spread) and
`cdf_at_capacity.png` (TTFT/TPOT of each mode's last passing probe) to `--out-dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadgen.capacity import Probe, ratios, search
from loadgen.report import RequestRecord, plot_cdfs, plot_vs_load, summarize, write_json
from loadgen.runner import replay
from loadgen.setup import Job, offered_rps, prepare
from loadgen.workload import rescale

__all__ = ["run_capacity"]

BASELINES = ("centralized", "sled")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_capacity(args: Any) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    job = prepare(args)
    base = offered_rps(job.specs)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    per_mode: dict[str, dict[str, Any]] = {}
    points: list[dict[str, Any]] = []
    at_capacity: dict[str, list[RequestRecord]] = {}
    with contextlib.ExitStack() as stack_ctx:
        infra = None
        if not args.nats_url:
            from services.stack.embedded import EmbeddedInfra

            tmp = stack_ctx.enter_context(tempfile.TemporaryDirectory())
            infra = stack_ctx.enter_context(EmbeddedInfra(os.path.join(tmp, "infra")))
        for mode in modes:
            _say(f"[capacity] mode {mode}")
            with _stack_for(args, infra, mode) as url:
                records_by_load: dict[float, list[RequestRecord]] = {}
                found = search(functools.partial(_probe, url, mode, job,
                                                 repeats=args.repeats, keep=records_by_load),
                               start=args.start_load, steps=args.steps, max_load=args.max_load,
                               say=_say)
            per_mode[mode] = found.as_dict(base)
            points += [p.point(mode) for p in found.probes]
            if found.passed is not None:
                at_capacity[mode] = records_by_load[found.passed.load]
    capacities = {m: r["capacity_rps"] for m, r in per_mode.items()}
    goodputs = {m: r["goodput_rps_at_capacity"] for m, r in per_mode.items()}
    result = {
        "modes": per_mode, "capacity_rps": capacities, "goodput_rps_at_capacity": goodputs,
        "capacity_ratios": ratios(capacities, BASELINES),
        "goodput_ratios": ratios(goodputs, BASELINES),
        "workload": {"trace": str(args.trace), "requests": len(job.specs), "base_rps": base,
                     "capped_to_model": len(job.capped), "slo_class": args.slo_class},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": Job.config_dict(args),
    }
    write_json(result, out_dir / "capacity.json")
    if args.json_out:
        write_json(result, args.json_out)
    plot_vs_load(points, out_dir / "vs_load.png")
    if at_capacity:
        plot_cdfs(at_capacity, out_dir / "cdf_at_capacity.png")
    text = _markdown(result)
    (out_dir / "capacity.md").write_text(text)
    print(text)
    return 0


def _probe(url: str, mode: str, job: Job, load: float, *, repeats: int,
           keep: dict[float, list[RequestRecord]]) -> Probe:
    """Replay the workload at `load` × its rate `repeats` times; the last repeat's records are
    kept by load (for the CDFs at capacity)."""
    specs = rescale(job.specs, rate_scale=load)
    offered = offered_rps(specs)
    attainments, goodputs, results = [], [], []
    for _ in range(repeats):
        outcome = asyncio.run(replay(url, specs, job.prompts, job.config(mode),
                                     capped=job.capped, say=lambda line: None))
        res = summarize(outcome.records, duration_s=outcome.duration_s, offered_rps=offered)
        attainments.append(res["slo_attainment"] or 0.0)
        goodputs.append(res["goodput_rps"] or 0.0)
        results.append(res)
        keep[load] = outcome.records
    return Probe(load, attainments, goodputs, offered, results)


@contextlib.contextmanager
def _stack_for(args: Any, infra: Any, mode: str):
    """The NATS URL to probe `mode` at: the given stack, or a fresh embedded one."""
    if infra is None:
        yield args.nats_url
        return
    from services.stack.launcher import stack_options, start_stack, stop_stack

    with tempfile.TemporaryDirectory() as state:
        stack = start_stack(stack_options(
            nats_url=infra.nats_url, redis_url=infra.redis_url, verifiers=1, device="cpu",
            state_dir=os.path.join(state, ".wisp")))
        try:
            yield stack.nats_url
        finally:
            stop_stack(stack)


def _markdown(result: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    w = result["workload"]
    lines = [f"# loadgen capacity: {Path(w['trace']).name}",
             "",
             f"{w['requests']} requests, base rate {fmt(w['base_rps'])} req/s, SLO class "
             f"{w['slo_class']}, {w['capped_to_model']} capped to the model; {result['machine']}",
             "",
             "| mode | capacity (req/s) | first failing (req/s) | goodput at capacity (req/s) "
             "| capacity vs centralized | capacity vs sled | goodput vs centralized "
             "| goodput vs sled |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        cr, gr = result["capacity_ratios"][mode], result["goodput_ratios"][mode]
        cap = fmt(r["capacity_rps"])
        if r["capacity_rps"] is not None and r["first_failing_rps"] is None:
            cap = f">= {cap} (never failed up to --max-load)"
        lines.append(f"| {mode} | {cap} | {fmt(r['first_failing_rps'])} | "
                     f"{fmt(r['goodput_rps_at_capacity'])} | {fmt(cr.get('vs_centralized'))} | "
                     f"{fmt(cr.get('vs_sled'))} | {fmt(gr.get('vs_centralized'))} | "
                     f"{fmt(gr.get('vs_sled'))} |")
    lines += ["", "Capacity: the highest probed load whose mean SLO attainment over the repeats "
              "was >= 90 %; the first failing load bounds it from above."]
    return "\n".join(lines) + "\n"
