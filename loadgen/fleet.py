"""Emulated edge fleets: which device profile each request of a workload runs on.

A :class:`Fleet` mixes named device profiles (services/edge_drafter/device_profile.py
``PROFILES``) by weight; :func:`load_fleets` reads the shipped presets (loadgen/fleets.toml)
and a user's file, :func:`assign` gives every request that names no device one drawn by
weight (seeded), and :func:`describe` states a fleet's numbers for a report.

The profiles are illustrative assumptions, not measurements, and connectivity gaps are not
emulated (the edge delays messages, a link never drops): every description says
``gaps_emulated: false``.
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
from services.edge_drafter.device_profile import PROFILES, DeviceProfile

__all__ = ["GAPS_EMULATED", "SHIPPED_FLEETS", "Fleet", "assign", "describe", "load_fleets"]

SHIPPED_FLEETS = Path(__file__).with_name("fleets.toml")
GAPS_EMULATED = False  # the edge has no notion of a dropped link (see fleets.toml)
_FILE_KEYS = {"fleets", "gaps_emulated"}
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
    if doc.get("gaps_emulated", False) is not False:
        raise ValueError(f"{path}: gaps_emulated must be false: the edge does not emulate "
                         "connectivity gaps")
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


def load_fleets(path: str | Path | None = None, *,
                profiles: Mapping[str, DeviceProfile] | None = None) -> dict[str, Fleet]:
    """The shipped fleets, plus those of `path` when given. Every error names the file and the
    fleet: a bad weight, an unknown profile (checked against `profiles`, by default the edge's
    ``PROFILES``), an unknown key, or a fleet that redefines a shipped one (a report's fleet
    name would then mean two things)."""
    table = PROFILES if profiles is None else profiles
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
    """A fleet's numbers for a report: every profile's share and emulated speed and link."""
    table = PROFILES if profiles is None else profiles
    _check_names(fleet, table, "describe")
    shares = fleet.shares
    return {
        "name": fleet.name,
        "description": fleet.description,
        "gaps_emulated": GAPS_EMULATED,
        "note": "illustrative assumptions, not measurements of real devices",
        "profiles": {
            name: {"share": shares[name],
                   "draft_ms_per_token": table[name].draft_ms_per_token,
                   "rtt_ms": table[name].rtt_ms,
                   "jitter_ms": table[name].jitter_ms,
                   "uplink_kbps": table[name].uplink_kbps,  # 0: unlimited
                   "downlink_kbps": table[name].downlink_kbps}
            for name in sorted(fleet.weights)},
    }
