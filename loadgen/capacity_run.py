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
import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any

from loadgen.capacity import Probe, ratios, search
from loadgen.fleet import edge_env
from loadgen.job import Job, offered_rps, prepare
from loadgen.partition import edges_behind, plan
from loadgen.progress import ProgressDisplay
from loadgen.report import (
    RequestRecord,
    plot_cdfs,
    plot_vs_load,
    session_devices,
    summarize,
    write_json,
)
from loadgen.runner import replay
from loadgen.stacks import embedded_infra, stack_for
from loadgen.workload import rescale, window

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
    # Planned once, before anything is pinned: pin_self narrows this process's own CPUs.
    part = plan() if args.partition and not args.nats_url else None
    at_capacity: dict[str, list[RequestRecord]] = {}
    with embedded_infra(args.nats_url) as infra:
        for mode in modes:
            _say(f"[capacity] mode {mode}")
            with stack_for(args.nats_url, infra, part, _say, "[capacity]",
                           extra_env=edge_env(job.fleets_file)) as (url, pinned):
                records_by_load: dict[float, list[RequestRecord]] = {}
                rounds: list[Any] = []
                found = search(functools.partial(_probe, url, mode, job, repeats=args.repeats,
                                                 keep=records_by_load, rounds=rounds,
                                                 quiet=args.quiet, probe_s=args.probe_s,
                                                 min_requests=args.min_probe_requests),
                               start=args.start_load, steps=args.steps, max_load=args.max_load,
                               min_load=args.min_load, say=_say)
            per_mode[mode] = found.as_dict(base)
            per_mode[mode]["partition"] = pinned
            # Over every probe, overloaded ones included (where falling behind is expected);
            # the mode's `valid` judges the two probes that decide its capacity.
            per_mode[mode]["edges_behind"] = edges_behind(rounds, session_devices(
                r for recs in records_by_load.values() for r in recs), profiles=job.profiles)
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
                     "probe_s": args.probe_s, "min_probe_requests": args.min_probe_requests,
                     "capped_to_model": len(job.capped), "slo_class": args.slo_class,
                     "fleet": job.fleet},
        "valid": all(r["valid"] for r in per_mode.values()),
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
           keep: dict[float, list[RequestRecord]], rounds: list[Any], quiet: bool,
           probe_s: float | None = None, min_requests: int = 1) -> Probe:
    """Replay the workload at `load` × its rate `repeats` times; the last repeat's records are
    kept by load (for the CDFs at capacity)."""
    specs = rescale(job.specs, rate_scale=load)
    if probe_s is not None:
        specs = window(specs, probe_s, min_requests=min_requests)
    offered = offered_rps(specs, probe_s)
    attainments, goodputs = [], []
    mine: list[Any] = []
    devices: dict[str, str] = {}
    for _ in range(repeats):
        # One line per probe comes from the search; a bar only where a terminal shows it.
        display = None if quiet else ProgressDisplay(label=f"{mode} x{load:.3g}", lines=False)
        outcome = asyncio.run(replay(url, specs, job.prompts, job.config(mode),
                                     capped=job.capped, say=lambda line: None, display=display))
        res = summarize(outcome.records, duration_s=outcome.duration_s, offered_rps=offered)
        attainments.append(res["slo_attainment"] or 0.0)
        goodputs.append(res["goodput_rps"] or 0.0)
        keep[load] = outcome.records
        mine += outcome.round_events
        devices.update(session_devices(outcome.records))
    rounds += mine
    return Probe(load, attainments, goodputs, offered,
                 edges=edges_behind(mine, devices, profiles=job.profiles))


def _markdown(result: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return "—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    w = result["workload"]
    lines = [f"# loadgen capacity: {Path(w['trace']).name}",
             "",
             f"{w['requests']} requests, base rate {fmt(w['base_rps'])} req/s"
             + (f" (each probe: the requests arriving in its first {w['probe_s']:g} s, at least "
                f"{w['min_probe_requests']})" if w.get("probe_s") else "") + ", SLO class "
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
        elif r.get("bound") == "lower":
            cap = f">= {cap} (edges behind at the first failing load)"
        def ratio(value: Any, base: str, r: dict[str, Any] = r) -> str:
            # A lower bound over an exact capacity is a lower bound; over another lower bound
            # it says nothing either way.
            if value is None or base not in result["modes"]:
                return fmt(value)
            mine, theirs = (r.get("bound") == "lower",
                            result["modes"][base].get("bound") == "lower")
            if theirs:
                return f"{fmt(value)} (bounds only)" if mine else f"<= {fmt(value)}"
            return f">= {fmt(value)}" if mine else fmt(value)

        lines.append(f"| {mode} | {cap} | {fmt(r['first_failing_rps'])} | "
                     f"{fmt(r['goodput_rps_at_capacity'])} | "
                     f"{ratio(cr.get('vs_centralized'), 'centralized')} | "
                     f"{ratio(cr.get('vs_sled'), 'sled')} | {fmt(gr.get('vs_centralized'))} | "
                     f"{fmt(gr.get('vs_sled'))} |")
    lines += ["", "Capacity: the highest probed load whose mean SLO attainment over the repeats "
              "was >= 90 %; the first failing load bounds it from above, unless the emulated "
              "edges fell behind their profile there (then only the lower bound stands). A "
              "pass with edges behind stands: slower devices made meeting the SLO harder, "
              "not easier."]
    fleet = w["fleet"]
    lines += ["", f"Fleet `{fleet['name']}`: " + ", ".join(
        f"{name} {p['share']:.0%} ({p['draft_ms_per_token']:g} ms/draft token, "
        f"RTT {p['rtt_ms']:g} ms" + (f", a {p['gap_s']:g} s link gap every ~{p['gap_every_s']:g} s"
                                     if p.get("gap_every_s") else "") + ")"
        for name, p in fleet["profiles"].items()) + "."]
    for mode, r in result["modes"].items():
        part, behind = r.get("partition"), r["edges_behind"]
        where = ("not partitioned (an external stack)" if part is None else
                 f"server CPUs {part['server']}, edge CPUs {part['edges']}"
                 + (" (shared: " + str(part["reason"]) + ")" if part["shared"] else ""))
        ends = "; ".join(f"{label} {p['edges_share_behind']:.1%}"
                         for label, p in _bracket(r)
                         if p is not None and p["edges_share_behind"] is not None)
        lines.append(f"- {mode}: {where}; edges behind their profile in "
                     f"{behind.get('share_behind', 0):.1%} of all judged rounds"
                     + (f" ({ends})" if ends else "")
                     + ("" if r["valid"] else " — INVALID: nothing passed and the edges fell "
                        "behind at the failures, so it measures this host, not the server")
                     + (" — capacity is a lower bound: the edges fell behind at the first "
                        "failing load (a host limit, not necessarily the server's)"
                        if r.get("bound") == "lower" and r["first_failing_rps"] is not None
                        else ""))
    return "\n".join(lines) + "\n"


def _bracket(mode_result: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
    """The probes at capacity and at the first failing load, from a mode's result dict."""
    by_load = {p["load"]: p for p in mode_result["probes"]}
    return [("at capacity", by_load.get(mode_result["capacity_load"])),
            ("first failing", by_load.get(mode_result["first_failing_load"]))]
