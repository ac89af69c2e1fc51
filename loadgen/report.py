"""Per-request records of a load-generator run into its results (DESIGN.md §7; no NATS).

The runner fills one :class:`RequestRecord` per request on the client's clock
(``time.perf_counter`` seconds); :func:`summarize` turns a run's records into a JSON-able
dict, :func:`write_json` and :func:`markdown` write it out, and the ``plot_*`` functions draw
PNGs (in :mod:`loadgen.plots`, imported only when a plot is asked for, so summarizing never
pays for matplotlib).

Definitions, the same as the metrics service's (services/metrics/aggregate.py):

* TTFT = first non-empty token chunk − send; TPOT = mean time per output token after the
  first, (done − first) / (n − 1) for n > 1 tokens; E2E = done − send;
* a request **meets its SLO** when TTFT ≤ its TTFT SLO and TPOT ≤ its TPOT SLO; one that
  failed or produced no token misses it; TPOT of a one-token request is undefined and does not
  fail it; a request with neither bound has no SLO (``met_slo`` None);
* SLO attainment = met / requests that carry an SLO (None when none does: "no SLO" is not
  "0 % met"); goodput = requests (and their output tokens) that met their SLO per second;
* rates are per second of ``duration_s``, the measured window the caller passes;
* percentiles interpolate linearly between closest ranks (numpy's default), as the metrics
  service's do; latency statistics cover completed requests (TTFT those with a token, TPOT
  those with two or more, as one-token TPOT is undefined).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.stats import percentile

__all__ = [
    "PERCENTILE_METHOD",
    "RequestRecord",
    "RoundSample",
    "capacity",
    "markdown",
    "measured",
    "percentile",
    "plot_cdfs",
    "plot_over_time",
    "plot_vs_load",
    "session_devices",
    "summarize",
    "write_json",
]

PERCENTILE_METHOD = "linear interpolation between closest ranks (numpy default)"
CAPACITY_ATTAINMENT = 0.9  # DESIGN.md §7: capacity is the highest load with attainment >= 90 %
UNFINISHED = "unfinished"  # error code of a failed request that never got an answer
UNKNOWN = "unknown"  # ... and of one that got a final message but no code


@dataclass(slots=True)
class RequestRecord:
    index: int
    mode: str
    sent_s: float  # client clock (time.perf_counter-based, seconds) when the request was sent
    first_token_s: float | None  # when the first non-empty token chunk arrived
    done_s: float | None  # when the final message arrived (None: never)
    num_tokens: int = 0  # output tokens received
    ok: bool = False  # finished without error
    error_code: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    prompt_tokens: int = 0
    server_ttft_ms: float | None = None  # the server's GenerateDone.timings (agreement check)
    server_tpot_ms: float | None = None
    capped: bool = False  # its lengths were capped to the model (reported)
    sid: str | None = None  # the session the server gave it (joins it to round events)
    device: str | None = None  # the device profile it asked for

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_s is None:
            return None
        return (self.first_token_s - self.sent_s) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per token after the first; 0 for a one-token request (undefined there,
        and 0 never fails an SLO); None without both timestamps."""
        if self.first_token_s is None or self.done_s is None:
            return None
        if self.num_tokens < 2:
            return 0.0
        return (self.done_s - self.first_token_s) * 1000.0 / (self.num_tokens - 1)

    @property
    def e2e_ms(self) -> float | None:
        return None if self.done_s is None else (self.done_s - self.sent_s) * 1000.0

    @property
    def completed(self) -> bool:
        return self.ok and self.done_s is not None

    @property
    def has_slo(self) -> bool:
        return self.ttft_slo_ms is not None or self.tpot_slo_ms is not None

    @property
    def met_slo(self) -> bool | None:
        """None: no SLO. A missing bound (only one of the two set) does not constrain."""
        if not self.has_slo:
            return None
        ttft, tpot = self.ttft_ms, self.tpot_ms
        if not self.completed or self.num_tokens == 0 or ttft is None or tpot is None:
            return False
        ttft_ok = self.ttft_slo_ms is None or ttft <= self.ttft_slo_ms
        tpot_ok = self.tpot_slo_ms is None or tpot <= self.tpot_slo_ms
        return ttft_ok and tpot_ok


@dataclass(slots=True)
class RoundSample:
    """One round (from a ``RoundEvent``) for the over-time plots."""

    t_s: float  # any clock in seconds; plots start the axis at the earliest sample
    mode: str
    batch_size: int
    accepted: int
    drafted: int

    @classmethod
    def from_event(cls, event: Any) -> RoundSample:
        """From a ``common.protocol.RoundEvent`` (duck-typed: ``ts_ms`` is the edge's wall
        clock in ms)."""
        return cls(t_s=event.ts_ms / 1000.0, mode=event.mode, batch_size=event.batch_size,
                   accepted=event.accepted, drafted=event.drafted)


# -- small pure helpers -----------------------------------------------------------------------
def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _stats_ms(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    mean = sum(ordered) / len(ordered) if ordered else None
    return {"p50": _round(percentile(ordered, 50)), "p90": _round(percentile(ordered, 90)),
            "p99": _round(percentile(ordered, 99)), "mean": _round(mean), "n": len(ordered)}


def _agreement(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """|client − server| in ms. The client's TTFT also holds the network and queueing before
    the server's clock starts, so a small positive gap is expected; a large one means the two
    measure different things."""
    gaps = sorted(abs(c - s) for c, s in pairs)
    return {"n": len(gaps), "max": _round(gaps[-1] if gaps else None),
            "p99": _round(percentile(gaps, 99))}


def session_devices(records: Iterable[RequestRecord]) -> dict[str, str]:
    """session id -> the device profile its request ran as ("none": no profile), which joins
    the stack's round events to the profiles (``loadgen.partition.edges_behind``)."""
    return {r.sid: r.device or "none" for r in records if r.sid}


# -- summary ----------------------------------------------------------------------------------
def measured(records: list[RequestRecord], warmup_s: float) -> list[RequestRecord]:
    """The records sent at least `warmup_s` after the run's first send (the rest are warm-up)."""
    t0 = min((r.sent_s for r in records), default=0.0)
    return [r for r in records if r.sent_s - t0 >= warmup_s]


def summarize(records: list[RequestRecord], *, duration_s: float,
              offered_rps: float | None = None, warmup_s: float = 0.0) -> dict[str, Any]:
    """The run's metrics (see the module's docstring for definitions).

    Records sent less than ``warmup_s`` after the first send are left out of every metric and
    counted as ``warmup``. ``duration_s`` is the measured window (after warm-up) over which
    rates are taken; ``offered_rps`` is reported as given (None: the caller did not say)."""
    if duration_s < 0 or warmup_s < 0:
        raise ValueError(f"duration_s and warmup_s must be >= 0, got {duration_s}, {warmup_s}")
    kept = measured(records, warmup_s)
    completed = [r for r in kept if r.completed]
    failed = [r for r in kept if not r.completed]
    with_slo = [r for r in kept if r.has_slo]
    met = [r for r in with_slo if r.met_slo]
    errors = Counter(r.error_code or (UNFINISHED if r.done_s is None else UNKNOWN)
                     for r in failed)

    if not with_slo:
        slo = "none"  # attainment and goodput are undefined, not zero
    elif len(with_slo) < len(kept):
        slo = "partial"  # requests without an SLO are left out of attainment
    else:
        slo = "all"
    goodput_rps = _ratio(len(met), duration_s) if with_slo else None
    goodput_tps = _ratio(sum(r.num_tokens for r in met), duration_s) if with_slo else None

    return {
        "requests": len(kept),
        "completed": len(completed),
        "failed": len(failed),
        "unfinished": sum(r.done_s is None for r in failed),
        "errors_by_code": dict(sorted(errors.items())),
        "warmup": len(records) - len(kept),
        "warmup_s": float(warmup_s),
        "capped": sum(r.capped for r in kept),
        "modes": sorted({r.mode for r in kept}),
        "slo": slo,
        "requests_with_slo": len(with_slo),
        "slo_met": len(met),
        "slo_attainment": _round(_ratio(len(met), len(with_slo)), 4),
        "goodput_rps": _round(goodput_rps, 4),
        "goodput_tokens_per_s": _round(goodput_tps),
        "output_tokens": sum(r.num_tokens for r in kept),
        "throughput_tokens_per_s": _round(_ratio(sum(r.num_tokens for r in kept),
                                                 duration_s)),
        "offered_rps": _round(offered_rps, 4),
        "sent_rps": _round(_ratio(len(kept), duration_s), 4),
        "achieved_rps": _round(_ratio(len(completed), duration_s), 4),
        "ttft_ms": _stats_ms(r.ttft_ms for r in completed if r.ttft_ms is not None),
        "tpot_ms": _stats_ms(r.tpot_ms for r in completed
                             if r.tpot_ms is not None and r.num_tokens >= 2),
        "e2e_ms": _stats_ms(r.e2e_ms for r in completed if r.e2e_ms is not None),
        "agreement": {
            "ttft_ms": _agreement([(r.ttft_ms, r.server_ttft_ms) for r in completed
                                   if r.ttft_ms is not None and r.server_ttft_ms is not None]),
            "tpot_ms": _agreement([(r.tpot_ms, r.server_tpot_ms) for r in completed
                                   if r.num_tokens >= 2 and r.tpot_ms is not None
                                   and r.server_tpot_ms is not None]),
        },
        "percentiles": PERCENTILE_METHOD,
        "duration_s": _round(duration_s),
    }


def capacity(points: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per mode, the highest ``load`` whose ``slo_attainment`` is >= 90 % (DESIGN.md §7);
    None for a mode that never reaches it (or has no SLO)."""
    out: dict[str, float | None] = {}
    for p in points:
        best = out.setdefault(p["mode"], None)
        att = p.get("slo_attainment")
        if att is not None and att >= CAPACITY_ATTAINMENT and (best is None or p["load"] > best):
            out[p["mode"]] = p["load"]
    return out


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers.
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")


# -- Markdown ---------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f} %"


def markdown(result: dict[str, Any], *, title: str) -> str:
    """A summary a human reads: counts and rates, then a latency table, then the agreement
    with the server's own timings."""
    r = result
    errors = ", ".join(f"{code}: {n}" for code, n in r.get("errors_by_code", {}).items())
    attainment = ("no SLO" if r.get("slo") == "none"
                  else f"{_pct(r.get('slo_attainment'))} ({r.get('slo_met')} of "
                       f"{r.get('requests_with_slo')})")
    rows = [
        ("requests (measured)", _fmt(r.get("requests"))),
        ("completed", _fmt(r.get("completed"))),
        ("failed", _fmt(r.get("failed")) + (f" ({errors})" if errors else "")),
        ("warm-up (excluded)", f"{_fmt(r.get('warmup'))} in the first "
                               f"{_fmt(r.get('warmup_s'), 1)} s"),
        ("capped to the model", _fmt(r.get("capped"))),
        ("measured window (s)", _fmt(r.get("duration_s"))),
        ("offered load (req/s)", _fmt(r.get("offered_rps"), 3)),
        ("achieved (req/s)", _fmt(r.get("achieved_rps"), 3)),
        ("throughput (tok/s)", _fmt(r.get("throughput_tokens_per_s"))),
        ("SLO attainment", attainment),
        ("goodput (req/s)", _fmt(r.get("goodput_rps"), 3)),
        ("goodput (tok/s)", _fmt(r.get("goodput_tokens_per_s"))),
    ]
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "| latency (ms) | p50 | p90 | p99 | mean | n |", "|---|---|---|---|---|---|"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        s = r.get(key) or {}
        lines.append(f"| {name} | " + " | ".join(_fmt(s.get(k)) for k in
                                                  ("p50", "p90", "p99", "mean", "n")) + " |")
    agreement = r.get("agreement") or {}
    if agreement:
        lines += ["", "| client vs server (ms) | max abs diff | p99 abs diff | n |",
                  "|---|---|---|---|"]
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            a = agreement.get(key) or {}
            lines.append(f"| {name} | {_fmt(a.get('max'))} | {_fmt(a.get('p99'))} | "
                         f"{_fmt(a.get('n'))} |")
    lines += ["", f"Percentiles: {r.get('percentiles', PERCENTILE_METHOD)}."]
    return "\n".join(lines) + "\n"


# -- plots (matplotlib is imported only here, on demand) --------------------------------------
def plot_cdfs(records_by_mode: dict[str, list[RequestRecord]],
              path: str | os.PathLike[str]) -> None:
    """TTFT and TPOT CDFs of completed requests, one line per mode, in one PNG."""
    from loadgen import plots

    plots.plot_cdfs(records_by_mode, path)


def plot_vs_load(points: list[dict[str, Any]], path: str | os.PathLike[str], *,
                 load_label: str = "offered load (req/s)") -> None:
    """SLO attainment and goodput vs load per mode, with error bars and the 90 % line.
    A point's optional ``err`` is the attainment's error bar, or a dict with one per metric
    (``{"slo_attainment": e, "goodput_rps": e}``)."""
    from loadgen import plots

    plots.plot_vs_load(points, path, load_label=load_label,
                       capacity_attainment=CAPACITY_ATTAINMENT, capacities=capacity(points))


def plot_over_time(samples: list[RoundSample], path: str | os.PathLike[str]) -> None:
    """Batch size and acceptance length (accepted per round) over time, per mode."""
    from loadgen import plots

    plots.plot_over_time(samples, path)
