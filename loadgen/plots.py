"""PNG plots of load-generator results (called through :mod:`loadgen.report`).

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot:
no display is touched, no global backend is switched, and nothing is left in pyplot's figure
registry of a long-lived process.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from loadgen.report import RequestRecord, RoundSample

__all__ = ["plot_cdfs", "plot_over_time", "plot_vs_load"]

TIME_BINS = 60  # over-time plots average rounds into this many bins: one point per round is noise


def _save(fig: Figure, path: str | os.PathLike[str]) -> None:
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders with Agg
    fig.savefig(os.fspath(path), format="png", dpi=110)


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _single(values: set[float | None]) -> float | None:
    """The one SLO bound every record shares, worth a reference line; None when they differ."""
    return next(iter(values)) if len(values) == 1 else None


def plot_cdfs(records_by_mode: dict[str, list[RequestRecord]],
              path: str | os.PathLike[str]) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        ("TTFT", lambda r: r.ttft_ms, lambda r: r.ttft_slo_ms),
        # One-token TPOT is undefined (0 by convention): it would put a false step at 0.
        ("TPOT", lambda r: r.tpot_ms if r.num_tokens >= 2 else None, lambda r: r.tpot_slo_ms),
    )
    for ax, (name, value, bound) in zip(axes, panels, strict=True):
        drawn = False
        bounds: set[float | None] = set()
        for mode in sorted(records_by_mode):
            done = [r for r in records_by_mode[mode] if r.completed]
            bounds.update(bound(r) for r in records_by_mode[mode])
            xs = sorted(v for v in map(value, done) if v is not None)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=f"{mode} (n={len(xs)})")
            drawn = True
        slo = _single(bounds)
        if slo is not None:
            ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="lower right")
        else:
            _no_data(ax)
    _save(fig, path)


def _err(point: dict[str, Any], key: str) -> float:
    err = point.get("err")
    if isinstance(err, dict):
        err = err.get(key)
    elif key != "slo_attainment":
        err = None  # a bare number is the attainment's error bar
    return math.nan if err is None else float(err)


def _value(point: dict[str, Any], key: str) -> float:
    v = point.get(key)
    return math.nan if v is None else float(v)  # NaN leaves a gap (e.g. a run without SLO)


def plot_vs_load(points: list[dict[str, Any]], path: str | os.PathLike[str], *,
                 load_label: str = "offered load (req/s)", capacity_attainment: float = 0.9,
                 capacities: dict[str, float | None] | None = None) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_att, ax_good = fig.subplots(1, 2)
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        by_mode[p["mode"]].append(p)
    capacities = capacities or {}
    for mode in sorted(by_mode):
        pts = sorted(by_mode[mode], key=lambda p: p["load"])
        loads = [p["load"] for p in pts]
        cap = capacities.get(mode)
        label = mode if cap is None else f"{mode} (capacity {cap:g})"
        line = ax_att.errorbar(loads, [_value(p, "slo_attainment") for p in pts],
                               yerr=[_err(p, "slo_attainment") for p in pts], marker="o",
                               capsize=3, label=label)
        ax_good.errorbar(loads, [_value(p, "goodput_rps") for p in pts],
                         yerr=[_err(p, "goodput_rps") for p in pts], marker="o", capsize=3,
                         label=mode, color=line.lines[0].get_color())
    ax_att.axhline(capacity_attainment, color="grey", linestyle="--", linewidth=1,
                   label=f"{capacity_attainment:.0%} attainment")
    ax_att.set(xlabel=load_label, ylabel="SLO attainment", title="SLO attainment vs load",
               ylim=(-0.02, 1.05))
    ax_good.set(xlabel=load_label, ylabel="goodput (req/s)", title="goodput vs load")
    for ax in (ax_att, ax_good):
        ax.grid(alpha=0.3)
        if points:
            ax.legend(loc="best")
    if not points:
        _no_data(ax_good)
    _save(fig, path)


def _binned(samples: list[RoundSample], t0: float, width: float,
            attr: str) -> tuple[list[float], list[float]]:
    """Mean of ``attr`` per time bin of ``width`` seconds (bin centres, means), empty bins
    left out; the latest round falls in the last bin, not one past it."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s in samples:
        acc = sums[min(int((s.t_s - t0) / width), TIME_BINS - 1)]
        acc[0] += getattr(s, attr)
        acc[1] += 1
    bins = sorted(sums)
    return [(b + 0.5) * width for b in bins], [sums[b][0] / sums[b][1] for b in bins]


def plot_over_time(samples: list[RoundSample], path: str | os.PathLike[str]) -> None:
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax_batch, ax_acc = fig.subplots(2, 1, sharex=True)
    by_mode: dict[str, list[RoundSample]] = defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    if samples:
        t0 = min(s.t_s for s in samples)
        span = max(s.t_s for s in samples) - t0
        width = span / TIME_BINS if span > 0 else 1.0
        for mode in sorted(by_mode):
            for ax, attr in ((ax_batch, "batch_size"), (ax_acc, "accepted")):
                xs, ys = _binned(by_mode[mode], t0, width, attr)
                ax.plot(xs, ys, marker="." if len(xs) < 3 else None,
                        label=f"{mode} ({len(by_mode[mode])} rounds)")
        for ax in (ax_batch, ax_acc):
            ax.legend(loc="best")
    else:
        _no_data(ax_batch)
    ax_batch.set(ylabel="batch size (mean per bin)", title="verification batch size")
    ax_acc.set(xlabel="time since first round (s)",
               ylabel="accepted per round (mean per bin)", title="acceptance length")
    for ax in (ax_batch, ax_acc):
        ax.grid(alpha=0.3)
    _save(fig, path)
