"""Workloads of the load generator: which requests arrive when, how long, under which SLO.

A workload is a list of :class:`RequestSpec`, in arrival order, from one of

* :func:`read_azure_trace` — the Azure LLM inference trace CSV (``TIMESTAMP, ContextTokens,
  GeneratedTokens``; ../shared/traces/README.md): lengths only, prompts are made by
  :class:`~loadgen.prompts.PromptBuilder`;
* :func:`read_jsonl` — one JSON object per line, lengths or the prompt text itself;
* :func:`synthetic` — seeded Poisson / gamma / constant arrivals with uniform lengths;

then shaped by :func:`rescale` (load sweeps, compressed replay), :func:`force_output` and
:func:`cap_lengths` (the model's context). Pure Python: nothing here talks to NATS or loads a
model, so a workload can be built, checked and stored before a run.

Output lengths are *forced*: the runner asks for exactly ``output_tokens`` new tokens
(``max_new_tokens``), as the trace's README says a replay does (an early EOS may still end one).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common.protocol import Slo
from loadgen.prompts import PromptBuilder

__all__ = [
    "DEFAULT_SLO_CLASSES",
    "PromptBuilder",
    "RequestSpec",
    "SloClass",
    "cap_lengths",
    "force_output",
    "read_azure_trace",
    "read_jsonl",
    "read_workload",
    "rescale",
    "slo_for",
    "synthetic",
]


@dataclass(slots=True, frozen=True)
class RequestSpec:
    """One request of a workload."""

    index: int  # position in the workload, 0-based
    arrival_s: float  # offset from the workload's start, seconds, non-decreasing in a workload
    prompt_tokens: int  # >= 1; for a prompt_text, an upper bound (PromptBuilder.ids_for)
    output_tokens: int  # >= 1: the runner's max_new_tokens
    slo_class: str | None = None  # a key of the SLO classes in use (slo_for), None: the default
    # A device profile name (services/edge_drafter/device_profile.py PROFILES), None: none.
    # Not checked here (that module needs the engine); the runner's get_profile refuses typos.
    device: str | None = None
    prompt_text: str | None = None  # the prompt itself (JSONL); None: PromptBuilder.build

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"request {self.index}: arrival_s must be finite and >= 0, "
                             f"got {self.arrival_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"request {self.index}: prompt_tokens and output_tokens must be "
                             f">= 1, got {self.prompt_tokens} and {self.output_tokens}")


# -- readers ----------------------------------------------------------------------------------
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_JSONL_KEYS = {"arrival_s", "timestamp", "prompt_tokens", "prompt", "output_tokens",
               "slo_class", "device"}


def _timestamp(text: str, where: str) -> datetime:
    """ISO 8601 (the trace's ``2023-11-16 18:17:03.9799600`` too: digits past microseconds are
    dropped); a naive time is taken as UTC so naive and aware stamps subtract."""
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{where}: bad timestamp {text!r} (expected ISO 8601, e.g. "
                         "'2023-11-16 18:17:03.9799600')") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _seconds(delta: timedelta | float) -> float:
    return delta.total_seconds() if isinstance(delta, timedelta) else delta


def _arrivals(stamps: list[datetime] | list[float], wheres: list[str]) -> list[float]:
    """Offsets from the first request read; time must not go backwards. Datetimes subtract
    exactly (a POSIX float of 2023 keeps only ~0.2 us), then become seconds."""
    for prev, cur, where in zip(stamps, stamps[1:], wheres[1:], strict=False):
        if cur < prev:
            raise ValueError(f"{where}: arrival goes backwards ({_seconds(cur - prev):+.6f} s);"
                             " a workload must be in arrival order")
    return [_seconds(t - stamps[0]) for t in stamps]


def read_azure_trace(path: str | Path, *, start: int = 0,
                     max_requests: int | None = None) -> list[RequestSpec]:
    """Rows ``start .. start+max_requests`` (0-based, after the header) of an Azure LLM
    inference trace, arrivals relative to the first row read. Rows before ``start`` are not
    checked. A count of 0 (a request that generated nothing) becomes 1: a replay needs a
    token to time; a negative or non-integer one is an error naming the file and line."""
    if start < 0 or (max_requests is not None and max_requests < 0):
        raise ValueError("start and max_requests must be >= 0")
    stamps: list[datetime] = []
    wheres: list[str] = []
    lengths: list[tuple[int, int]] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in _AZURE_COLUMNS if name not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header} lacks column(s) {missing} "
                             f"(expected {', '.join(_AZURE_COLUMNS)})")
        cols = [header.index(name) for name in _AZURE_COLUMNS]
        seen = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # a blank line (e.g. at the end) is no request
            seen += 1
            if seen <= start:
                continue
            if max_requests is not None and len(stamps) >= max_requests:
                break
            where = f"{path}:{reader.line_num}"
            if len(row) < len(header):
                raise ValueError(f"{where}: {len(row)} column(s), the header has {len(header)}")
            stamp = _timestamp(row[cols[0]], where)
            counts = []
            for name, col in zip(_AZURE_COLUMNS[1:], cols[1:], strict=True):
                try:
                    value = int(row[col].strip())
                except ValueError:
                    raise ValueError(f"{where}: {name} {row[col]!r} is not an integer") from None
                if value < 0:
                    raise ValueError(f"{where}: {name} {value} is negative")
                counts.append(max(1, value))
            stamps.append(stamp)
            wheres.append(where)
            lengths.append((counts[0], counts[1]))
    return [RequestSpec(i, t, p, o) for i, (t, (p, o))
            in enumerate(zip(_arrivals(stamps, wheres), lengths, strict=True))]


def _count(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # some JSON writers spell every number as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key!r} must be an integer >= 1, got {value!r}")
    return value


def _optional_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def read_jsonl(path: str | Path, *, start: int = 0, max_requests: int | None = None,
               tokenizer: Any = None) -> list[RequestSpec]:
    """One JSON object per line (blank lines skipped), arrivals relative to the first request
    read; every error names the file and line. Keys (others are refused, so a typo is loud):

    * ``arrival_s`` (seconds, >= 0) or ``timestamp`` (ISO 8601) — one form per file;
    * ``prompt_tokens`` (a length: PromptBuilder makes the prompt) and/or ``prompt`` (the
      text). A text without ``prompt_tokens`` gets its token count from ``tokenizer`` when one
      is given, else its UTF-8 byte count — an upper bound for byte-level tokenizers, so
      :func:`cap_lengths` errs on the safe side; with both, the text is cut to its last
      ``prompt_tokens`` tokens;
    * ``output_tokens``; optional ``slo_class`` and ``device`` (strings).
    """
    if start < 0 or (max_requests is not None and max_requests < 0):
        raise ValueError("start and max_requests must be >= 0")
    rows: list[tuple[str, dict[str, Any]]] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_requests is not None and len(rows) >= max_requests + start:
                break
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    rows = rows[start:]
    form = "timestamp" if rows and "timestamp" in rows[0][1] else "arrival_s"
    stamps: list[Any] = []  # datetimes or seconds, by the file's form
    wheres: list[str] = []
    specs: list[RequestSpec] = []
    for i, (where, obj) in enumerate(rows):
        unknown = sorted(set(obj) - _JSONL_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(_JSONL_KEYS)}")
        if ("timestamp" in obj) == ("arrival_s" in obj) or form not in obj:
            raise ValueError(f"{where}: give exactly one of 'arrival_s' and 'timestamp', the "
                             f"same on every line (the first request has {form!r})")
        if form == "timestamp":
            stamp = obj["timestamp"]
            if not isinstance(stamp, str):
                raise ValueError(f"{where}: 'timestamp' must be an ISO 8601 string")
            stamps.append(_timestamp(stamp, where))
        else:
            t = obj["arrival_s"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not (
                    math.isfinite(t) and t >= 0):
                raise ValueError(f"{where}: 'arrival_s' must be a number >= 0, got {t!r}")
            stamps.append(float(t))
        wheres.append(where)
        text = _optional_str(obj, "prompt", where)
        if text is None and "prompt_tokens" not in obj:
            raise ValueError(f"{where}: give 'prompt_tokens' or 'prompt'")
        if text == "":
            raise ValueError(f"{where}: 'prompt' is empty")
        if "prompt_tokens" in obj:
            prompt_tokens = _count(obj, "prompt_tokens", where)
        elif tokenizer is not None:
            prompt_tokens = max(1, len(tokenizer.encode(text, add_special_tokens=False)))
        else:
            prompt_tokens = len(text.encode())
        if "output_tokens" not in obj:
            raise ValueError(f"{where}: 'output_tokens' is missing")
        specs.append(RequestSpec(i, 0.0, prompt_tokens, _count(obj, "output_tokens", where),
                                 _optional_str(obj, "slo_class", where),
                                 _optional_str(obj, "device", where), text))
    arrivals = _arrivals(stamps, wheres)
    return [dataclasses.replace(s, arrival_s=t) for s, t in zip(specs, arrivals, strict=True)]


def read_workload(path: str | Path, **kw: Any) -> list[RequestSpec]:
    """By suffix: ``.csv`` an Azure trace, ``.jsonl`` / ``.json`` JSON lines; ``kw`` (``start``,
    ``max_requests``; ``tokenizer`` for JSONL) pass through."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return read_azure_trace(path, **kw)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, **kw)
    raise ValueError(f"{path}: unknown workload format {suffix!r} (.csv, .jsonl or .json)")


# -- synthetic --------------------------------------------------------------------------------
def _gaps(rng: random.Random, rate_rps: float, arrivals: str, burstiness: float) -> Iterator[float]:
    mean = 1.0 / rate_rps
    if arrivals in ("poisson", "constant") and burstiness != 1.0:
        raise ValueError(f"burstiness applies to arrivals='gamma' ({arrivals!r} has a fixed "
                         "one: 1 for poisson, 0 for constant)")
    if arrivals == "poisson":
        while True:
            yield rng.expovariate(rate_rps)
    elif arrivals == "gamma":
        if not (math.isfinite(burstiness) and burstiness > 0):
            raise ValueError(f"burstiness must be > 0, got {burstiness}")
        shape = 1.0 / burstiness**2  # a gamma's CV is 1/sqrt(shape)
        while True:
            yield rng.gammavariate(shape, mean / shape)
    elif arrivals == "constant":
        while True:
            yield mean
    else:
        raise ValueError(f"unknown arrivals {arrivals!r}: poisson, gamma or constant")


def _range(name: str, bounds: tuple[int, int]) -> tuple[int, int]:
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} range must satisfy 1 <= low <= high, got {bounds}")
    return lo, hi


def synthetic(n: int, rate_rps: float, *, arrivals: str = "poisson", burstiness: float = 1.0,
              prompt_tokens: tuple[int, int] = (128, 512),
              output_tokens: tuple[int, int] = (32, 128), seed: int = 0,
              slo_class: str | None = None, device: str | None = None) -> list[RequestSpec]:
    """`n` requests at a mean rate of `rate_rps`: the first at 0, then gaps of mean 1/rate —
    exponential (``poisson``), gamma with coefficient of variation `burstiness` (``gamma``: 1 is
    Poisson, > 1 burstier, < 1 more regular) or exactly 1/rate (``constant``). Lengths are
    uniform in the inclusive ranges. Arrivals and lengths draw from separate streams of `seed`,
    so the same seed gives the same workload and changing the arrival process keeps lengths."""
    if n < 0 or not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"need n >= 0 and a finite rate_rps > 0, got {n} and {rate_rps}")
    p_lo, p_hi = _range("prompt_tokens", prompt_tokens)
    o_lo, o_hi = _range("output_tokens", output_tokens)
    gaps = _gaps(random.Random(f"wisp-synthetic:{seed}:arrivals"), rate_rps, arrivals,
                 burstiness)
    lengths = random.Random(f"wisp-synthetic:{seed}:lengths")
    specs, t = [], 0.0
    for i in range(n):
        if i:
            t += next(gaps)
        specs.append(RequestSpec(i, t, lengths.randint(p_lo, p_hi), lengths.randint(o_lo, o_hi),
                                 slo_class, device))
    return specs


# -- shaping ----------------------------------------------------------------------------------
def rescale(specs: Iterable[RequestSpec], *, rate_scale: float = 1.0,
            time_compression: float = 1.0) -> list[RequestSpec]:
    """Divide every arrival by ``rate_scale * time_compression`` (lengths unchanged).

    The two do the same thing to the timeline and compose multiplicatively; they are kept apart
    because a report states them differently: ``rate_scale`` is the load axis of a sweep
    ("2x the trace's request rate"), ``time_compression`` how a long trace is replayed in
    less wall time (an hour in six minutes is 10), a property of the experiment's setup."""
    factor = rate_scale * time_compression
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"rate_scale and time_compression must be > 0, got {rate_scale} and "
                         f"{time_compression}")
    return [dataclasses.replace(s, arrival_s=s.arrival_s / factor) for s in specs]


def window(specs: Iterable[RequestSpec], duration_s: float, *,
           min_requests: int = 1) -> list[RequestSpec]:
    """The requests that arrive in the first `duration_s` seconds, and at least the first
    `min_requests` (all there are, if fewer): a load probe then lasts about as long at every
    load instead of shrinking to a burst as the rate grows."""
    if not (math.isfinite(duration_s) and duration_s > 0) or min_requests < 1:
        raise ValueError(f"need duration_s > 0 and min_requests >= 1, got {duration_s} and "
                         f"{min_requests}")
    ordered = sorted(specs, key=lambda s: s.arrival_s)
    start = ordered[0].arrival_s if ordered else 0.0
    inside = [s for s in ordered if s.arrival_s - start < duration_s]
    return inside if len(inside) >= min_requests else ordered[:min_requests]


def force_output(specs: Iterable[RequestSpec], output_tokens: int | None) -> list[RequestSpec]:
    """Every request generates `output_tokens` (None: each keeps its own)."""
    if output_tokens is None:
        return list(specs)
    if output_tokens < 1:
        raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
    return [dataclasses.replace(s, output_tokens=output_tokens) for s in specs]


def cap_lengths(specs: Iterable[RequestSpec], *, max_prompt_tokens: int, max_output_tokens: int,
                max_context: int) -> tuple[list[RequestSpec], int]:
    """Fit every request in the model: prompt <= `max_prompt_tokens`, output <=
    `max_output_tokens`, prompt + output <= `max_context`. Returns the specs and how many were
    changed (a report states it).

    When prompt + output is too long, the *output* is cut first: the prompt has already been
    capped and keeps the trace's prefill load, and to guarantee outputs a length, pass
    ``max_prompt_tokens = max_context - reserve``. The prompt is cut further only to leave
    one output token when ``max_prompt_tokens >= max_context``."""
    if min(max_prompt_tokens, max_output_tokens) < 1 or max_context < 2:
        raise ValueError("need max_prompt_tokens >= 1, max_output_tokens >= 1, max_context >= 2")
    out, changed = [], 0
    for s in specs:
        prompt = min(s.prompt_tokens, max_prompt_tokens, max_context - 1)
        output = min(s.output_tokens, max_output_tokens, max_context - prompt)
        if (prompt, output) != (s.prompt_tokens, s.output_tokens):
            changed += 1
            s = dataclasses.replace(s, prompt_tokens=prompt, output_tokens=output)
        out.append(s)
    return out, changed


# -- SLO classes ------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class SloClass:
    name: str
    ttft_ms: float
    tpot_ms: float

    def to_slo(self) -> Slo:
        """The wire form (the client's ``slo=`` takes it)."""
        return Slo(ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms)


# Assumptions of this project, not measurements or a standard: an interactive user (a chat or
# completion that should start within a second and stream faster than reading speed), a
# standard API call, and batch work that only needs to finish. Pass your own for claims.
DEFAULT_SLO_CLASSES: dict[str, SloClass] = {
    c.name: c for c in (
        SloClass("interactive", ttft_ms=1000.0, tpot_ms=100.0),
        SloClass("standard", ttft_ms=3000.0, tpot_ms=200.0),
        SloClass("batch", ttft_ms=20000.0, tpot_ms=1000.0),
    )
}


def slo_for(spec: RequestSpec, classes: dict[str, SloClass],
            default: str | None) -> SloClass | None:
    """The request's class, else `default`'s; None when both are None (no SLO). An unknown
    name is an error listing the known ones."""
    name = spec.slo_class or default
    if name is None:
        return None
    if name not in classes:
        raise ValueError(f"request {spec.index}: unknown SLO class {name!r}; known: "
                         f"{sorted(classes)}")
    return classes[name]
