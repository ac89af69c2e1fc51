"""Emulated edge devices: draft speed and network link, applied at the edge's ports (around
the draft port and the NATS verify port) so that a benchmark can model a device honestly and
reproducibly on any host.

The named profiles are illustrative assumptions for experiments, not measurements of real
devices; pass explicit numbers (or your own measured profile) for claims about hardware.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from common.engine.session import DraftPort
from common.errors import ErrorCode, WispError
from common.transport.generation import NatsVerifyPort


@dataclass(slots=True, frozen=True)
class DeviceProfile:
    name: str
    draft_ms_per_token: float = 0.0  # 0: as fast as this host drafts; else emulate this speed
    rtt_ms: float = 0.0  # round trip edge <-> server, split evenly up and down
    jitter_ms: float = 0.0  # extra one-way delay drawn uniformly from [0, jitter_ms]
    uplink_kbps: float = 0.0  # 0: unlimited
    downlink_kbps: float = 0.0

    def __post_init__(self) -> None:
        for name in ("draft_ms_per_token", "rtt_ms", "jitter_ms", "uplink_kbps",
                     "downlink_kbps"):
            if getattr(self, name) < 0:
                raise ValueError(f"device profile {self.name!r}: {name} must be >= 0")


PROFILES: dict[str, DeviceProfile] = {
    p.name: p for p in (
        DeviceProfile("none"),
        DeviceProfile("lan", rtt_ms=2.0, jitter_ms=0.5),
        DeviceProfile("wifi", rtt_ms=20.0, jitter_ms=5.0, uplink_kbps=50_000,
                      downlink_kbps=100_000),
        DeviceProfile("4g", rtt_ms=60.0, jitter_ms=15.0, uplink_kbps=10_000,
                      downlink_kbps=30_000),
        DeviceProfile("slow-phone-4g", draft_ms_per_token=25.0, rtt_ms=60.0, jitter_ms=15.0,
                      uplink_kbps=10_000, downlink_kbps=30_000),
        # The emulated fleets' devices (loadgen/fleets.toml), assumptions like the rest: a
        # Jetson-class box on Wi-Fi, a phone on LTE, and a wired edge server drafting on a
        # server-class CPU. No connectivity gaps: the edge emulates none (a link never drops).
        DeviceProfile("jetson-wifi", draft_ms_per_token=8.0, rtt_ms=20.0, jitter_ms=5.0,
                      uplink_kbps=50_000, downlink_kbps=100_000),
        DeviceProfile("phone-lte", draft_ms_per_token=25.0, rtt_ms=60.0, jitter_ms=15.0,
                      uplink_kbps=10_000, downlink_kbps=30_000),
        DeviceProfile("edge-server-wired", draft_ms_per_token=3.0, rtt_ms=2.0, jitter_ms=0.5),
    )
}


def get_profile(name: str | None) -> DeviceProfile | None:
    """None or '' means no emulation; an unknown name is an error listing the known ones."""
    if not name or name == "none":
        return None
    if name not in PROFILES:
        raise ValueError(f"unknown device profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name]


class LinkEmulator:
    """Per-session delays for one profile; seeded so a run can be repeated exactly."""

    def __init__(self, profile: DeviceProfile, seed: int):
        self.profile = profile
        self._rng = random.Random(seed)

    @property
    def uplink_ms(self) -> float:
        """The edge's estimate of its one-way time to the server (for round budgets)."""
        return self.profile.rtt_ms / 2

    def draft_delay_s(self, num_tokens: int, measured_s: float) -> float:
        """Extra wait so drafting `num_tokens` takes as long as on the emulated device."""
        if not self.profile.draft_ms_per_token:
            return 0.0
        return max(0.0, num_tokens * self.profile.draft_ms_per_token / 1e3 - measured_s)

    def uplink_delay_s(self, num_bytes: int) -> float:
        return self._one_way_s(num_bytes, self.profile.uplink_kbps)

    def downlink_delay_s(self, num_bytes: int) -> float:
        return self._one_way_s(num_bytes, self.profile.downlink_kbps)

    def _one_way_s(self, num_bytes: int, kbps: float) -> float:
        ms = self.profile.rtt_ms / 2 + self._rng.uniform(0.0, self.profile.jitter_ms)
        if kbps:
            ms += num_bytes * 8 / kbps  # kbit/s == bit/ms
        return ms / 1e3


class EmulatedDrafter:
    """A DraftPort that drafts as slowly as the emulated device: after the real draft it
    waits out the rest of the profile's per-token time, and reports that time per token."""

    def __init__(self, inner: DraftPort, link: LinkEmulator):
        self.inner, self.link = inner, link

    async def draft(self, sid: str):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        draft = await self.inner.draft(sid)
        k = len(draft.token_ids)
        await asyncio.sleep(self.link.draft_delay_s(k, loop.time() - t0))
        if self.link.profile.draft_ms_per_token:
            draft.token_times_s = [self.link.profile.draft_ms_per_token / 1e3] * k
        return draft

    async def apply(self, sid, num_accepted, new_tokens, round_trip_s) -> None:
        await self.inner.apply(sid, num_accepted, new_tokens, round_trip_s)

    async def resync(self, sid, committed) -> None:
        await self.inner.resync(sid, committed)


def emulate(default_profile: DeviceProfile | None):
    """The edge's emulation hook for `GenerationServer`: a request's named profile (or the
    process's default) shapes that session's ports; an unknown name is a BAD_REQUEST."""

    def wrap(name: str | None, sid: str, verifier: NatsVerifyPort,
             drafter: DraftPort | None) -> tuple[NatsVerifyPort, DraftPort | None]:
        try:
            profile = get_profile(name) if name else default_profile
        except ValueError as exc:
            raise WispError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if profile is None:
            return verifier, drafter
        link = LinkEmulator(profile, seed=int(sid[:16], 16))
        verifier.link = link
        return verifier, EmulatedDrafter(drafter, link) if drafter is not None else None

    return wrap
