"""Device profiles: the numbers an emulated edge device runs with (draft speed, link,
connectivity gaps) and the TOML files they come from.

The presets ship in ``profiles.toml`` beside this module and are read at import
(:data:`PROFILES`). A user's file adds ``[profiles.NAME]`` tables in the same form
(:func:`load_profiles`): the edge-drafter's ``--device-profiles``, or a loadgen fleets file,
whose ``[fleets.*]`` tables this reader leaves to loadgen (one format, two readers).

No engine import: loadgen reads profiles without pulling in the model code.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.subjects import is_name

__all__ = ["PRESETS_FILE", "PROFILES", "DeviceProfile", "get_profile", "load_profiles",
           "read_profiles"]

PRESETS_FILE = Path(__file__).with_name("profiles.toml")
# Top-level keys of a shared file that belong to other readers: loadgen's fleets file holds
# its fleets beside its profiles. Anything else is refused, so a typo cannot pass silently.
_OTHER_READERS = frozenset({"fleets"})


@dataclass(slots=True, frozen=True)
class DeviceProfile:
    name: str
    draft_ms_per_token: float = 0.0  # 0: as fast as this host drafts; else emulate this speed
    rtt_ms: float = 0.0  # round trip edge <-> server, split evenly up and down
    jitter_ms: float = 0.0  # extra one-way delay drawn uniformly from [0, jitter_ms]
    uplink_kbps: float = 0.0  # 0: unlimited
    downlink_kbps: float = 0.0
    # Connectivity gaps: link-up times between gaps are exponential with this mean (0: no
    # gaps), each gap lasts gap_s; a message sent during one waits for its end.
    gap_every_s: float = 0.0
    gap_s: float = 0.0

    def __post_init__(self) -> None:
        for name in NUMBER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"device profile {self.name!r}: {name} must be a number, "
                                 f"got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"device profile {self.name!r}: {name} must be a finite "
                                 f"number >= 0, got {value!r}")
        if (self.gap_every_s > 0) != (self.gap_s > 0):
            raise ValueError(f"device profile {self.name!r}: gap_every_s and gap_s go "
                             f"together (both > 0 or both 0), got {self.gap_every_s!r} and "
                             f"{self.gap_s!r}")

    @property
    def has_gaps(self) -> bool:
        return self.gap_every_s > 0


NUMBER_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile) if f.name != "name")


def read_profiles(path: str | Path) -> dict[str, DeviceProfile]:
    """The ``[profiles.NAME]`` tables of one file, presets not included. Every error is a
    ValueError naming the file (and the profile and field where there is one): unreadable or
    invalid TOML, an unknown key, a name a request could not carry, a non-number or a negative
    number."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the device profiles ({exc.strerror})") from None
    unknown = sorted(set(doc) - {"profiles"} - _OTHER_READERS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: "
                         f"{sorted({'profiles'} | _OTHER_READERS)}")
    tables = doc.get("profiles", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: 'profiles' must be a table of [profiles.NAME] tables")
    return {name: _profile(path, name, table) for name, table in tables.items()}


def _profile(path: str | Path, name: str, table: Any) -> DeviceProfile:
    if not is_name(name):  # a request names its profile in a protocol Name field
        raise ValueError(f"{path}: device profile {name!r}: not a valid name (1-256 of "
                         "A-Z a-z 0-9 _ . @ + / -)")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: device profile {name!r} must be a table of numbers")
    unknown = sorted(set(table) - set(NUMBER_FIELDS))
    if unknown:
        raise ValueError(f"{path}: device profile {name!r}: unknown key(s) {unknown}; known: "
                         f"{list(NUMBER_FIELDS)}")
    try:
        return DeviceProfile(name, **table)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


PROFILES: dict[str, DeviceProfile] = read_profiles(PRESETS_FILE)


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """The presets plus the profiles of `path` (None or '': the presets alone). A file may not
    redefine a preset: a report's profile name would then mean two things."""
    merged = dict(PROFILES)
    if not path:
        return merged
    for name, profile in read_profiles(path).items():
        if name in PROFILES:
            raise ValueError(f"{path}: device profile {name!r} is a preset ({PRESETS_FILE}); "
                             "give yours another name")
        merged[name] = profile
    return merged


def get_profile(name: str | None,
                profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile | None:
    """`name` in `profiles` (default: the presets). None, '' or 'none' means no emulation; an
    unknown name is an error listing the known ones."""
    table = PROFILES if profiles is None else profiles
    if not name or name == "none":
        return None
    if name not in table:
        raise ValueError(f"unknown device profile {name!r}; known: {sorted(table)}")
    return table[name]
