"""Capacity search: the highest offered load at which SLO attainment stays >= 90 % (DESIGN.md §7).

The load is a multiplier of a base workload's request rate (`rescale(rate_scale=L)`). A probe
replays the workload at one load, `repeats` times; its attainment is the mean over repeats and
its error bar their spread (min to max). The search first grows the load geometrically from
`start` until a probe fails (or `max_load`), then bisects between the highest passing and the
lowest failing load `steps` times (geometric midpoints: load effects are multiplicative). The
result is the bracket [highest pass, lowest fail] itself, so a report can say how sharp the
answer is, with every probe kept. Pure logic: the probe is a callable (the CLI's replays one
workload through a stack; tests pass a synthetic curve).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadgen.report import CAPACITY_ATTAINMENT

__all__ = ["Probe", "Search", "ratios", "search"]


@dataclass(slots=True)
class Probe:
    load: float  # rate multiplier of the base workload
    attainments: list[float]  # one per repeat
    goodputs_rps: list[float]
    offered_rps: float | None = None
    # edges_behind() over this probe's rounds (None: not judged): a probe whose edges fell
    # behind their profiles measured the host running them, not the fleet.
    edges: dict[str, Any] | None = None

    @property
    def edges_kept_up(self) -> bool:
        return self.edges is None or bool(self.edges["valid"])

    @property
    def attainment(self) -> float:
        return statistics.fmean(self.attainments)

    @property
    def goodput_rps(self) -> float:
        return statistics.fmean(self.goodputs_rps)

    @property
    def passed(self) -> bool:
        return self.attainment >= CAPACITY_ATTAINMENT

    def point(self, mode: str) -> dict[str, Any]:
        """For `plot_vs_load`: the mean, with the spread over repeats as the error bar."""
        return {"mode": mode, "load": self.offered_rps or self.load,
                "slo_attainment": self.attainment, "goodput_rps": self.goodput_rps,
                "err": {"slo_attainment": _half_spread(self.attainments),
                        "goodput_rps": _half_spread(self.goodputs_rps)}}

    def as_dict(self) -> dict[str, Any]:
        return {"load": self.load, "offered_rps": self.offered_rps,
                "slo_attainment": round(self.attainment, 4),
                "attainments": [round(a, 4) for a in self.attainments],
                "goodput_rps": round(self.goodput_rps, 4),
                "goodputs_rps": [round(g, 4) for g in self.goodputs_rps],
                "passed": self.passed,
                "edges_share_behind": (round(self.edges["share_behind"], 4)
                                       if self.edges is not None else None),
                "edges_kept_up": self.edges_kept_up}


@dataclass(slots=True)
class Search:
    probes: list[Probe]
    passed: Probe | None  # the highest load that kept attainment >= 90 %
    failed: Probe | None  # the lowest load that did not (None: never failed up to max_load)

    def as_dict(self, base_rps: float | None) -> dict[str, Any]:
        def rps(p: Probe | None) -> float | None:
            if p is None:
                return None
            return p.offered_rps or (p.load * base_rps if base_rps else None)

        return {"capacity_load": self.passed.load if self.passed else None,
                "capacity_rps": rps(self.passed),
                "goodput_rps_at_capacity": self.passed.goodput_rps if self.passed else None,
                "first_failing_load": self.failed.load if self.failed else None,
                "first_failing_rps": rps(self.failed),
                **self.bound(),
                "probes": [p.as_dict() for p in sorted(self.probes, key=lambda p: p.load)]}


    def bound(self) -> dict[str, Any]:
        """What the bracket can claim given whether the emulated edges kept up.

        A pass where the edges fell behind still stands: slower devices mean longer rounds and
        a later first token for the same server work per request (the rounds a request needs
        do not depend on how fast its device drafts), so the SLO was met under conditions
        harder than the profile's. A failure where they fell behind may be the emulating
        host's, not the server's: the capacity is then only a lower bound (`bound`
        ``lower``), as it is when nothing failed up to the highest load tried. With no pass
        and edges behind at every failure, nothing stands (`valid` false): the host, not the
        server, may be what failed."""
        if self.passed is None:
            valid = self.failed is None or self.failed.edges_kept_up
            return {"bound": None, "valid": valid}
        upper = self.failed is not None and self.failed.edges_kept_up
        return {"bound": "bracket" if upper else "lower", "valid": True,
                "edges_kept_up_at_capacity": self.passed.edges_kept_up}


def search(probe: Callable[[float], Probe], *, start: float = 1.0, growth: float = 2.0,
           steps: int = 3, max_load: float = 64.0, min_load: float = 1 / 64,
           say: Callable[[str], None] | None = None) -> Search:
    """Bracket and bisect the 90 % attainment load (see the module docstring)."""
    say = say or (lambda line: None)
    probes: list[Probe] = []

    def run(load: float) -> Probe:
        p = probe(load)
        probes.append(p)
        say(f"[capacity] load x{load:.3g}: attainment {p.attainment:.1%} "
            f"({', '.join(f'{a:.0%}' for a in p.attainments)}), goodput "
            f"{p.goodput_rps:.3g} req/s -> {'pass' if p.passed else 'fail'}"
            + ("" if p.edges is None or not p.edges["rounds"] else
               f"; edges behind in {p.edges['share_behind']:.1%} of rounds"
               + ("" if p.edges_kept_up else
                  " (over the profile: the pass stands, the devices were slower)" if p.passed
                  else " (over the profile: this failure may be the host's)")))
        return p

    first = run(start)
    passed, failed = (first, None) if first.passed else (None, first)
    # Grow (or shrink) geometrically until the 90 % line is bracketed.
    while passed is not None and failed is None and passed.load * growth <= max_load:
        p = run(passed.load * growth)
        passed, failed = (p, None) if p.passed else (passed, p)
    while failed is not None and passed is None and failed.load / growth >= min_load:
        p = run(failed.load / growth)
        passed, failed = (p, failed) if p.passed else (None, p)
    for _ in range(steps):
        if passed is None or failed is None:
            break
        p = run(math.sqrt(passed.load * failed.load))
        if p.passed:
            passed = p
        else:
            failed = p
    return Search(probes, passed, failed)


def ratios(capacities: dict[str, float | None], baselines: tuple[str, ...]) -> dict[str, dict]:
    """capacity of each mode over each baseline's (None where either is unknown or zero)."""
    out: dict[str, dict] = {}
    for mode, cap in capacities.items():
        out[mode] = {f"vs_{b}": (round(cap / capacities[b], 3)
                                 if cap and capacities.get(b) else None)
                     for b in baselines if b != mode}
    return out


def _half_spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
