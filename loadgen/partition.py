"""Split one machine's CPUs between the server side and the emulated edges.

On one host the emulated edge-drafters, the load generator and the server (verifiers,
scheduler, metrics, predictor, nats-server, redis-server) share CPUs: a verifier's busy
threads then slow drafting down, and an emulated phone drafts slower than its profile says —
the very effect a fleet experiment measures would be hidden in host contention. So:

* :func:`plan` splits the CPUs this process may use into two disjoint sets;
* :func:`apply` pins a started stack's processes to their side, :func:`pin_self` the load
  generator (it goes with the edges: it stands in for the users on those devices);
* :func:`edges_behind` checks afterwards that the edges kept up with their profiles: the
  emulation sleeps a draft up to the profile's time, so a draft that took longer means the host
  fell behind, and the run's numbers describe the host rather than the fleet.

Threads: the number of threads torch (or OpenMP) starts is fixed at import from the CPUs it
sees then; pinning afterwards does not shrink the pool. Setting ``OMP_NUM_THREADS`` (the
stack's ``extra_env``) to the side's size is the caller's business.

Linux only (``os.sched_setaffinity``, ``/proc``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.protocol import SERVER_MODES
from services.edge_drafter.profiles import PROFILES, DeviceProfile

__all__ = ["EDGE_MODULES", "Partition", "apply", "edges_behind", "pin_self", "plan"]

# Every other service of the stack is server side.
EDGE_MODULES = frozenset({"services.edge_drafter"})


@dataclass(slots=True, frozen=True)
class Partition:
    """CPUs for the server side and for the edges: disjoint and non-empty, unless `shared`
    (one CPU: both sides get it, and `reason` says why the run is not isolated)."""

    server: frozenset[int]
    edges: frozenset[int]
    shared: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"server": sorted(self.server), "edges": sorted(self.edges),
                "shared": self.shared, "reason": self.reason}


def _usable_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))  # a container's or taskset's limit, not the host's
    return set(range(os.cpu_count() or 1))


def plan(cpus: set[int] | None = None, server_share: float = 0.5) -> Partition:
    """Split `cpus` (default: the CPUs this process may run on) into a server set of about
    `server_share` of them (at least one, and one left for the edges) and an edge set.
    The server gets the lowest-numbered CPUs. With one CPU nothing can be split: a shared
    partition, which a report should flag."""
    if not (math.isfinite(server_share) and 0 < server_share < 1):
        raise ValueError(f"server_share must be in (0, 1), got {server_share}")
    ordered = sorted(_usable_cpus() if cpus is None else cpus)
    if not ordered:
        raise ValueError("no CPUs to partition")
    if len(ordered) == 1:
        both = frozenset(ordered)
        return Partition(both, both, shared=True,
                         reason="one CPU: the server and the edges share it, so the edges' "
                                "drafting competes with the server")
    n_server = min(max(round(len(ordered) * server_share), 1), len(ordered) - 1)
    return Partition(frozenset(ordered[:n_server]), frozenset(ordered[n_server:]))


def _descendants(pid: int) -> list[int]:
    """Processes started by `pid` (and theirs) that are alive now, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone since the listing
        # The command name, in parentheses, may hold spaces: the fields follow the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _pin_process(pid: int, cpus: frozenset[int]) -> int:
    """Pin every thread of `pid`: on Linux the affinity is per thread, and a process's
    existing threads (torch's pool, nats-server's Go threads) do not follow its main thread;
    threads and children started later inherit. Returns the threads pinned. Raises
    ProcessLookupError when the process is gone."""
    os.sched_setaffinity(pid, cpus)  # the main thread first: raises if the process is gone
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return 1  # exited just now; its main thread was pinned
    pinned = 1
    for tid in tids:
        if tid == pid:
            continue
        try:
            os.sched_setaffinity(tid, cpus)
            pinned += 1
        except ProcessLookupError:
            pass  # the thread ended in between
    return pinned


def _zombie(pid: int) -> bool:
    """Exited but not yet reaped: the kernel still takes its affinity, so ask /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False  # no /proc entry: sched_setaffinity will say the process is gone


def _pin(name: str, pid: int | None, side: str, cpus: frozenset[int], proc: Any = None,
         children: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "pid": pid, "side": side, "cpus": sorted(cpus)}
    if pid is None:
        return {**entry, "status": "not started"}
    if proc is not None and proc.poll() is not None:
        return {**entry, "status": "gone", "returncode": proc.returncode}
    if _zombie(pid):
        return {**entry, "status": "gone"}
    try:
        threads = _pin_process(pid, cpus)
        kids = _descendants(pid) if children else []
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):  # ended in between: nothing to pin
                threads += _pin_process(kid, cpus)
    except ProcessLookupError:
        return {**entry, "status": "gone"}
    except OSError as exc:  # e.g. EPERM: not ours, EINVAL: a CPU we may not use
        return {**entry, "status": "error", "error": str(exc)}
    return {**entry, "status": "pinned", "threads": threads, "children": kids}


def _result(partition: Partition, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {**partition.to_dict(),
            "complete": all(e["status"] == "pinned" for e in entries),
            "processes": {e["name"]: e for e in entries}}


def apply(stack: Any, partition: Partition) -> dict[str, Any]:
    """Pin a started stack: edge-drafters to ``partition.edges``, every other service and the
    embedded nats-server and redis-server to ``partition.server``. Reads ``stack.services``
    (each with ``name``, ``module``, ``proc``) and ``stack.infra`` (None: external servers,
    not ours to pin). Returns, for the report, each process by name with its pid, side, CPUs
    and status: ``pinned`` (with threads and children), ``gone`` (it had exited: reported,
    not raised), ``not started`` or ``error``; ``complete`` is true when all were pinned."""
    entries = []
    for svc in stack.services:
        edge = svc.module in EDGE_MODULES
        proc = svc.proc
        entries.append(_pin(svc.name, proc.pid if proc is not None else None,
                            "edges" if edge else "server",
                            partition.edges if edge else partition.server, proc))
    infra = getattr(stack, "infra", None)
    if infra is not None:
        for name, server in (("nats-server", infra.nats), ("redis-server", infra.redis)):
            try:
                pid = server.pid
            except RuntimeError:  # EmbeddedServer.pid before start
                pid = None
            entries.append(_pin(name, pid, "server", partition.server))
    return _result(partition, entries)


def pin_self(partition: Partition) -> dict[str, Any]:
    """Pin this process (the load generator, all its threads) with the edges. Its children
    are left alone: when this process started the stack, they are the stack's services, which
    :func:`apply` pins. Call it after starting the stack: children inherit the affinity of
    the moment they start, and the stack's must not start on the edges' CPUs."""
    return _result(partition, [_pin("loadgen", os.getpid(), "edges", partition.edges,
                                    children=False)])


def _field(event: Any, name: str) -> Any:
    """A RoundEvent's field, or a key of its JSON form (events read back from a file)."""
    return event[name] if isinstance(event, Mapping) else getattr(event, name)


def edges_behind(round_events: Iterable[Any], fleet_profiles: Mapping[str, str],
                 tolerance: float = 0.25, *, max_share: float = 0.05, slack_ms: float = 1.0,
                 profiles: Mapping[str, DeviceProfile] | None = None) -> dict[str, Any]:
    """Did the edges keep up with their profiles? A round is *behind* when its drafting took
    longer than ``draft_ms_per_token * drafted * (1 + tolerance) + slack_ms``: the emulation
    sleeps a draft up to the profile's time, so only a host that fell behind takes longer.
    ``slack_ms`` absorbs the event loop's late wake-ups (about a millisecond), which would
    otherwise flag one-token drafts of a fast profile.

    `fleet_profiles` maps a session id to its profile name (the caller knows which request
    ran where). Rounds that drafted nothing (a stopped draft) or on the server (colocated,
    centralized: `common.protocol.SERVER_MODES`), of sessions not
    in the map, or of profiles that emulate no speed (they draft as fast as the host can,
    there is nothing to fall behind) are not judged, only counted. The run is ``valid`` when
    no profile has more than `max_share` of its rounds behind — per profile, so a small group
    of slow devices is not hidden by a large group of fast ones; ``worst`` lists the profiles
    with rounds behind, the largest share first.

    `profiles` maps a profile name to its numbers: by default the edge's presets; a fleets
    file's own profiles need ``loadgen.fleet.known_profiles(path)`` (presets included), else
    their rounds go unjudged."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if not 0 <= max_share <= 1:
        raise ValueError(f"max_share must be in [0, 1], got {max_share}")
    if profiles is None:
        profiles = PROFILES
    by_profile: dict[str, dict[str, Any]] = {}
    unjudged = 0
    for event in round_events:
        drafted = _field(event, "drafted")
        if _field(event, "mode") in SERVER_MODES:
            drafted = 0  # colocated drafts on the server: no device there to fall behind
        name = fleet_profiles.get(_field(event, "sid"))
        profile = profiles.get(name) if name is not None else None
        if not drafted or profile is None or not profile.draft_ms_per_token:
            unjudged += 1
            continue
        expected_ms = profile.draft_ms_per_token * drafted
        ratio = _field(event, "draft_ms") / expected_ms
        stats = by_profile.setdefault(name, {"rounds": 0, "behind": 0, "max_ratio": 0.0})
        stats["rounds"] += 1
        stats["behind"] += _field(event, "draft_ms") > expected_ms * (1 + tolerance) + slack_ms
        stats["max_ratio"] = max(stats["max_ratio"], ratio)  # draft time / the profile's
    for stats in by_profile.values():
        stats["share_behind"] = stats["behind"] / stats["rounds"]
    rounds = sum(s["rounds"] for s in by_profile.values())
    behind = sum(s["behind"] for s in by_profile.values())
    worst = sorted((n for n, s in by_profile.items() if s["behind"]),
                   key=lambda n: (-by_profile[n]["share_behind"], n))
    return {
        "tolerance": tolerance, "slack_ms": slack_ms, "max_share": max_share,
        "rounds": rounds, "behind": behind,
        "share_behind": behind / rounds if rounds else 0.0,
        "unjudged_rounds": unjudged,
        "valid": all(s["share_behind"] <= max_share for s in by_profile.values()),
        "worst": worst,
        "by_profile": by_profile,
    }
