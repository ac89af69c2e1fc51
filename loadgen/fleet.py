"""Emulated edge fleets: which device profile each request of a workload runs on.

A :class:`Fleet` mixes named device profiles by weight; :func:`load_fleets` reads the shipped
presets (loadgen/fleets.toml) and a user's file, :func:`assign` gives every request that names
no device one drawn by weight (seeded), and :func:`describe` states a fleet's numbers for a
report.

A profile name is one of the edge's presets (services/edge_drafter/profiles.toml) or a
``[profiles.NAME]`` table of the fleets file itself, in the edge's own format: hand the same
file to the edge-drafter (:func:`edge_env`) and it emulates those profiles too, and judge the
run against :func:`known_profiles` (``edges_behind(..., profiles=...)``). The presets are
illustrative assumptions, not measurements; profiles with ``gap_every_s`` lose their link now
and then (the edge holds messages through a gap), and a description lists them.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.workload import RequestSpec
from services.edge_drafter.profiles import PROFILES, DeviceProfile, load_profiles

__all__ = ["SHIPPED_FLEETS", "Fleet", "assign", "describe", "edge_env", "known_profiles",
           "load_fleets"]

SHIPPED_FLEETS = Path(__file__).with_name("fleets.toml")
# [profiles.*] are the edge's format, read by services.edge_drafter.profiles.
_FILE_KEYS = {"fleets", "profiles"}
_FLEET_KEYS = {"profiles", "description"}


@dataclass(slots=True, frozen=True)
class Fleet:
    """Device profiles by relative weight (> 0; they need not sum to 1)."""

    name: str
    weights: dict[str, float]
    description: str = ""
    _cumulative: tuple[tuple[str, ...], tuple[float, ...]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a fleet needs a name")
        if not self.weights:
            raise ValueError(f"fleet {self.name!r}: no profiles")
        for profile, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                    math.isfinite(weight) and weight > 0):
                raise ValueError(f"fleet {self.name!r}: weight of {profile!r} must be a finite "
                                 f"number > 0, got {weight!r}")
        # A copy: the caller's dict changing later must not desynchronize the draw table.
        object.__setattr__(self, "weights", dict(self.weights))
        # Sorted names, so a fleet draws the same whatever order its file lists them in.
        names = tuple(sorted(self.weights))
        total = sum(self.weights.values())
        bounds = tuple(itertools.accumulate(self.weights[n] / total for n in names))
        object.__setattr__(self, "_cumulative", (names, bounds))

    @property
    def shares(self) -> dict[str, float]:
        """The weights normalized to sum to 1."""
        total = sum(self.weights.values())
        return {name: w / total for name, w in self.weights.items()}

    def draw(self, u: float) -> str:
        """The profile a uniform draw ``u`` in [0, 1) falls on."""
        names, bounds = self._cumulative
        # min(): the last bound may round to just below 1.0.
        return names[min(bisect.bisect_right(bounds, u), len(names) - 1)]


def _check_names(fleet: Fleet, profiles: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(fleet.weights) - set(profiles))
    if unknown:
        raise ValueError(f"{where}: fleet {fleet.name!r}: unknown device profile(s) {unknown}; "
                         f"known: {sorted(profiles)}")


def _read(path: Path, profiles: Mapping[str, Any]) -> dict[str, Fleet]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(_FILE_KEYS)}")
    tables = doc.get("fleets", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: 'fleets' must be a table of [fleets.NAME] tables")
    fleets: dict[str, Fleet] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: fleet {name!r} must be a table")
        unknown = sorted(set(table) - _FLEET_KEYS)
        if unknown:
            raise ValueError(f"{path}: fleet {name!r}: unknown key(s) {unknown}; known: "
                             f"{sorted(_FLEET_KEYS)}")
        weights = table.get("profiles")
        if not isinstance(weights, dict):
            raise ValueError(f"{path}: fleet {name!r}: 'profiles' must be a table of profile "
                             "name = weight")
        description = table.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"{path}: fleet {name!r}: 'description' must be a string")
        try:
            fleet = Fleet(name, dict(weights), description)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        _check_names(fleet, profiles, str(path))
        fleets[name] = fleet
    return fleets


def known_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Every profile a fleet may draw: the edge's presets plus the ``[profiles.NAME]`` tables
    of the fleets file `path` (checked as the edge checks them: a bad number or a preset's
    name is a ValueError naming the file, profile and field). Pass it to
    :func:`describe` and to ``loadgen.partition.edges_behind(..., profiles=...)``."""
    return load_profiles(path)


def edge_env(path: str | Path | None) -> dict[str, str]:
    """Environment for an edge-drafter that must know the fleets file's own profiles (a
    stack's ``extra_env``); an external stack's edges need the same file. Empty without a
    file."""
    if not path:
        return {}
    return {"WISP_DEVICE_PROFILES": str(Path(path).resolve())}


def load_fleets(path: str | Path | None = None, *,
                profiles: Mapping[str, DeviceProfile] | None = None) -> dict[str, Fleet]:
    """The shipped fleets, plus those of `path` when given. Every error names the file and the
    fleet: a bad weight, an unknown profile (checked against `profiles`, by default
    :func:`known_profiles` of `path`), an unknown key, or a fleet that redefines a shipped one
    (a report's fleet name would then mean two things)."""
    table = known_profiles(path) if profiles is None else profiles
    fleets = _read(SHIPPED_FLEETS, table)
    if path is not None:
        for name, fleet in _read(Path(path), table).items():
            if name in fleets:
                raise ValueError(f"{path}: fleet {name!r} is a shipped fleet "
                                 f"({SHIPPED_FLEETS}); give yours another name")
            fleets[name] = fleet
    return fleets


def assign(specs: Iterable[RequestSpec], fleet: Fleet, seed: int) -> list[RequestSpec]:
    """Each request without a device gets one drawn from `fleet` by weight; those that name one
    keep it. One draw per request whether used or not, so a request's device depends only on
    `seed` and its position: naming the device of one request leaves the others' draws alone,
    and two fleets with the same profiles draw alike (common random numbers)."""
    rng = random.Random(f"wisp-fleet:{seed}")
    out = []
    for spec in specs:
        u = rng.random()
        out.append(spec if spec.device is not None
                   else dataclasses.replace(spec, device=fleet.draw(u)))
    return out


def describe(fleet: Fleet, *,
             profiles: Mapping[str, DeviceProfile] | None = None) -> dict[str, Any]:
    """A fleet's numbers for a report: every profile's share, emulated speed, link and gaps
    (`profiles`: where its names are defined, by default the presets; pass
    :func:`known_profiles` for a file's own)."""
    table = PROFILES if profiles is None else profiles
    _check_names(fleet, table, "describe")
    shares = fleet.shares
    with_gaps = sorted(n for n in fleet.weights if table[n].has_gaps)
    return {
        "name": fleet.name,
        "description": fleet.description,
        # Gaps are emulated (a message sent in one waits for its end); these profiles have any.
        "gaps_emulated": bool(with_gaps),
        "profiles_with_gaps": with_gaps,
        "note": "preset profiles are illustrative assumptions, not measurements of real "
                "devices",
        "profiles": {
            name: {"share": shares[name],
                   "preset": table[name] == PROFILES.get(name),  # else a file's own numbers
                   "draft_ms_per_token": table[name].draft_ms_per_token,
                   "rtt_ms": table[name].rtt_ms,
                   "jitter_ms": table[name].jitter_ms,
                   "uplink_kbps": table[name].uplink_kbps,  # 0: unlimited
                   "downlink_kbps": table[name].downlink_kbps,
                   "gap_every_s": table[name].gap_every_s,  # 0: no gaps
                   "gap_s": table[name].gap_s}
            for name in sorted(fleet.weights)},
    }
