"""`loadgen sweep`: every mode at every load of a rate or concurrency sweep, side by side.

One workload, the same SLOs for every mode, the loads in ascending order. Without `--nats-url`
or `--state-dir` each mode gets its own embedded stack, partitioned (`loadgen.stacks`); with
one, that stack serves every mode. Each point is replayed `--repeats` times (a repeat the error
budget stopped ends the point: its remaining repeats would only fail the same way), its
metrics and the edges' validity are in `loadgen.sweep`. Writes `sweep.json`, `sweep.md`,
`vs_load.png` (attainment and goodput against the load per mode), `cdf.png` (TTFT/TPOT of each
mode at its highest passing load) and `over_time_<mode>.png` (batch size and acceptance length
at the mode's highest load) to `--out-dir`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from pathlib import Path
from typing import Any

from loadgen import sweep
from loadgen.fleet import edge_env
from loadgen.job import Job, offered_rps, prepare
from loadgen.partition import edges_behind, plan
from loadgen.progress import ProgressDisplay
from loadgen.report import (
    RequestRecord,
    RoundSample,
    measured,
    plot_cdfs,
    plot_over_time,
    plot_vs_load,
    session_devices,
    write_json,
)
from loadgen.runner import ReplayOutcome, replay
from loadgen.stacks import embedded_infra, stack_for
from loadgen.workload import rescale

__all__ = ["run_sweep"]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_sweep(args: Any) -> int:
    from loadgen.cli import MODES

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"--modes: unknown or none {unknown}; known: {', '.join(MODES)}")
    if args.repeats < 1 or args.warmup_s < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup-s >= 0, got {args.repeats} and "
                         f"{args.warmup_s}")
    axis, loads = (("concurrency", sorted(set(args.concurrency))) if args.concurrency
                   else ("rate_scale", sorted(set(args.rates))))
    external = args.nats_url
    if not external and args.state_dir:
        from services.stack.launcher import stack_nats_url

        external = stack_nats_url(None, args.state_dir)
    job = prepare(args)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Planned once, before anything is pinned: pin_self narrows this process's own CPUs.
    part = plan() if args.partition and not external else None
    points: list[dict[str, Any]] = []
    per_mode: dict[str, dict[str, Any]] = {}
    cdf_records: dict[str, list[RequestRecord]] = {}
    with embedded_infra(external) as infra:
        for mode in modes:
            _say(f"[sweep] mode {mode}")
            with stack_for(external, infra, part, _say, "[sweep]",
                           extra_env=edge_env(job.fleets_file)) as (url, pinned):
                mine, kept = _sweep_mode(url, mode, job, axis, loads, args)
            points += mine
            # The CDF at the highest load the mode passed; the rounds at its highest load.
            at, passed = sweep.cdf_loads(mine, axis)[mode]
            cdf_records[f"{mode} at {sweep.AXES[axis]} {at:g}"
                        + ("" if passed else " (none passed)")] = kept[at][0]
            plot_over_time([RoundSample.from_event(e) for e in kept[max(loads)][1]],
                           out_dir / f"over_time_{mode}.png")
            per_mode[mode] = {"partition": pinned, "cdf_at": at, "cdf_at_passed": passed}
    result = {
        "axis": axis, "loads": loads, "modes": per_mode, "points": points,
        "broken_modes": sweep.broken_modes(points),
        "warmup_s": args.warmup_s, "repeats": args.repeats,
        "workload": {"trace": Path(args.trace).name, "requests": len(job.specs),
                     "base_rps": offered_rps(job.specs), "capped_to_model": len(job.capped),
                     "slo_class": args.slo_class, "fleet": job.fleet},
        "edges_valid": all(p["edges_valid"] is not False for p in points),
        "partition": part.to_dict() if part else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": Job.config_dict(args),
    }
    write_json(result, out_dir / "sweep.json")
    if args.json_out:
        write_json(result, args.json_out)
    plot_vs_load(sweep.vs_load_points(points, axis), out_dir / "vs_load.png",
                 load_label="concurrent clients" if axis == "concurrency"
                 else "offered load (req/s)")
    plot_cdfs(cdf_records, out_dir / "cdf.png")
    text = sweep.markdown(result)
    (out_dir / "sweep.md").write_text(text)
    print(text)
    return 1 if result["broken_modes"] else 0


def _sweep_mode(url: str, mode: str, job: Job, axis: str, loads: list[float], args: Any
                ) -> tuple[list[dict[str, Any]], dict[float, tuple[list[RequestRecord], list]]]:
    """The mode's points, and per load its measured records (for the CDF) and the last
    repeat's round events (for the over-time plot)."""
    points, kept = [], {}
    for load in loads:
        closed = axis == "concurrency"
        specs = job.specs if closed else rescale(job.specs, rate_scale=load)
        label = f"{mode} {'c=' if closed else 'x'}{load:g}"
        outcomes: list[ReplayOutcome] = []
        for _ in range(args.repeats):
            # The sweep prints one line per point; a bar only where a terminal shows it.
            display = None if args.quiet else ProgressDisplay(label=label, lines=False)
            outcomes.append(asyncio.run(replay(
                url, specs, job.prompts, job.config(mode), capped=job.capped,
                concurrency=int(load) if closed else None, say=lambda line: None,
                display=display)))
            if outcomes[-1].stopped_early:
                break
        rounds = [e for o in outcomes for e in o.round_events]
        devices = session_devices(r for o in outcomes for r in o.records)
        p = sweep.point(mode, axis, load, outcomes, warmup_s=args.warmup_s,
                        offered_rps=None if closed else offered_rps(specs),
                        edges=edges_behind(rounds, devices, profiles=job.profiles or None))
        points.append(p)
        kept[load] = ([r for o in outcomes for r in measured(o.records, args.warmup_s)],
                      outcomes[-1].round_events)
        _say(_point_line(label, p))
    return points, kept


def _point_line(label: str, p: dict[str, Any]) -> str:
    att = "no SLO" if p["slo_attainment"] is None else f"attainment {p['slo_attainment']:.1%}"
    ttft = p["ttft_ms"]["p90"]
    line = (f"[sweep] {label}: {p['completed']}/{p['requests']} completed, {p['failed']} "
            f"failed, {att}, goodput {p['goodput_rps'] or 0:.3g} req/s, TTFT p90 "
            + ("—" if ttft is None else f"{ttft:.0f} ms")
            + f" -> {'pass' if p['passed'] else 'fail'}")
    if p["edges_valid"] is not None:
        line += f"; edges behind in {p['edges_share_behind']:.1%} of rounds" + (
            "" if p["edges_valid"] else " (INVALID: the host fell behind the fleet)")
    if p["stopped_early"]:
        line += f"; stopped early ({p['stopped_early']})"
    return line
