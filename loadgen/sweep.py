"""A sweep's results: one point per (mode, load), the table, the plots' inputs (no NATS).

The load axis is either ``rate_scale`` (open loop: the workload's arrivals made L times as
dense) or ``concurrency`` (closed loop: N clients, each sending its next request when its
previous one finished). A point holds DESIGN.md §7's metrics over its repeats' measured
requests (warm-up left out; percentiles over the repeats' requests together, rates over their
measured windows added up), each repeat's attainment and goodput (their spread is the plot's
error bar), whether the error budget stopped it, and whether the emulated edges kept up with
their profiles while it ran. `loadgen.sweep_run` runs the points through a stack.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loadgen.report import CAPACITY_ATTAINMENT, measured, summarize

if TYPE_CHECKING:
    from loadgen.runner import ReplayOutcome

__all__ = [
    "AXES",
    "broken_modes",
    "cdf_loads",
    "markdown",
    "point",
    "table_row",
    "vs_load_points",
]

AXES = {"rate_scale": "rate ×", "concurrency": "clients"}  # JSON key -> table heading


def point(mode: str, axis: str, load: float, outcomes: list[ReplayOutcome], *,
          warmup_s: float, offered_rps: float | None,
          edges: dict[str, Any] | None) -> dict[str, Any]:
    """One (mode, load) point from its repeats' outcomes (see the module docstring).
    `edges`: ``edges_behind`` over its round events (None: not judged)."""
    if axis not in AXES:
        raise ValueError(f"unknown sweep axis {axis!r}; known: {sorted(AXES)}")
    runs = [summarize(o.records, duration_s=_window(o, warmup_s), offered_rps=offered_rps,
                      warmup_s=warmup_s) for o in outcomes]
    kept = [r for o in outcomes for r in measured(o.records, warmup_s)]
    pooled = summarize(kept, duration_s=sum(_window(o, warmup_s) for o in outcomes),
                       offered_rps=offered_rps)
    pooled["warmup"], pooled["warmup_s"] = sum(r["warmup"] for r in runs), float(warmup_s)
    stopped = [f"repeat {i + 1}: {o.stopped_early}" for i, o in enumerate(outcomes)
               if o.stopped_early]
    judged = edges is not None and edges["rounds"] > 0
    out: dict[str, Any] = {"mode": mode, axis: load, "repeats": len(outcomes),
                           "stopped_early": "; ".join(stopped) or None}
    out.update(pooled)
    out.update({
        "passed": _passed(pooled, bool(stopped)),
        "attainments": [r["slo_attainment"] for r in runs],
        "goodputs_rps": [r["goodput_rps"] for r in runs],
        # None: no round was judged (no emulated device speed to fall behind).
        "edges_valid": bool(edges["valid"]) if judged else None,
        "edges_share_behind": round(edges["share_behind"], 4) if judged else None,
        "edges_behind": edges,
    })
    return out


def _window(outcome: ReplayOutcome, warmup_s: float) -> float:
    """The measured window: the run less its warm-up, as `loadgen replay` takes it."""
    return max(0.0, outcome.duration_s - warmup_s)


def _passed(summary: dict[str, Any], stopped_early: bool) -> bool:
    """Within SLO: attainment >= 90 % (DESIGN.md §7's capacity line); without an SLO, every
    request completed. A point the error budget stopped never passes."""
    if stopped_early:
        return False
    if summary["slo_attainment"] is None:
        return summary["failed"] == 0 and summary["requests"] > 0
    return summary["slo_attainment"] >= CAPACITY_ATTAINMENT


def vs_load_points(points: Iterable[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """For `plot_vs_load`: x is the offered req/s of a rate sweep (the client count of a
    concurrency sweep), with the repeats' spread as error bars."""
    out = []
    for p in points:
        x = p[axis] if axis == "concurrency" else (p["offered_rps"] or p[axis])
        out.append({"mode": p["mode"], "load": x, "slo_attainment": p["slo_attainment"],
                    "goodput_rps": p["goodput_rps"],
                    "err": {"slo_attainment": _half_spread(p["attainments"]),
                            "goodput_rps": _half_spread(p["goodputs_rps"])}})
    return out


def _half_spread(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return (max(known) - min(known)) / 2 if len(known) > 1 else None


def cdf_loads(points: Iterable[dict[str, Any]], axis: str) -> dict[str, tuple[float, bool]]:
    """Per mode, the load whose latencies the CDF shows: the highest that passed (True), or,
    when none did, the lowest (False: the mode's best case, labelled as not passing)."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_mode.setdefault(p["mode"], []).append(p)
    out = {}
    for mode, pts in by_mode.items():
        passed = [p[axis] for p in pts if p["passed"]]
        out[mode] = (max(passed), True) if passed else (min(p[axis] for p in pts), False)
    return out


def broken_modes(points: Iterable[dict[str, Any]]) -> list[str]:
    """Modes whose every point the error budget stopped: the mode (or its stack) is broken,
    not loaded, and the sweep says so in its exit status."""
    stopped: dict[str, bool] = {}
    for p in points:
        stopped[p["mode"]] = stopped.get(p["mode"], True) and p["stopped_early"] is not None
    return sorted(m for m, all_stopped in stopped.items() if all_stopped)


# -- Markdown ---------------------------------------------------------------------------------
def _num(v: Any, fmt: str = ".3g") -> str:
    return "—" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def _ms(stats: dict[str, Any]) -> str:
    return " / ".join(_num(stats.get(k), ".1f") for k in ("p50", "p90", "p99"))


def _edges(p: dict[str, Any]) -> str:
    if p["edges_valid"] is None:
        return "— (not judged)"
    return "yes" if p["edges_valid"] else f"NO ({p['edges_share_behind']:.1%} behind)"


def table_row(p: dict[str, Any], axis: str) -> str:
    # A closed loop offers what it sends: its offered rate is the rate it sent.
    offered = p["offered_rps"] if p["offered_rps"] is not None else p["sent_rps"]
    done = f"{p['completed']} / {p['failed']}" + (" (stopped early)" if p["stopped_early"]
                                                  else "")
    return (f"| {p['mode']} | {_num(p[axis], 'g')} | {_num(offered)} | {done} | "
            f"{_pct(p['slo_attainment'])} | {_num(p['goodput_rps'])} | {_ms(p['ttft_ms'])} | "
            f"{_ms(p['tpot_ms'])} | {_edges(p)} |")


def markdown(result: dict[str, Any]) -> str:
    """`sweep.md`: the workload in a line, then one table row per point."""
    axis, w = result["axis"], result["workload"]
    lines = [f"# loadgen sweep: {w['trace']}",
             "",
             f"{w['requests']} requests per point, base rate {_num(w['base_rps'])} req/s, SLO "
             f"class {w['slo_class']}, {w['capped_to_model']} capped to the model, fleet "
             f"`{w['fleet']['name']}`, warm-up {result['warmup_s']:g} s excluded, "
             f"{result['repeats']} repeat(s) per point; {result['machine']}",
             "",
             f"| mode | {AXES[axis]} | offered (req/s) | completed / failed | attainment | "
             "goodput (req/s) | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | "
             "edges valid |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(p, axis) for p in result["points"]]
    lines += ["", "Attainment: the share of requests that met their SLO (≥ 90 % passes, DESIGN.md "
              "§7); edges valid: the emulated devices kept up with their profiles."]
    if axis == "concurrency":
        lines.append("Closed loop: each client sends its next request when its previous one "
                     "finished, so the offered rate is the rate sent.")
    if result["broken_modes"]:
        lines.append(f"Every point of {', '.join(result['broken_modes'])} was stopped by the "
                     "error budget: a broken mode or stack, not a load level.")
    return "\n".join(lines) + "\n"
