"""Emulated edge devices: draft speed and network link, applied at the edge's ports (around
the draft port and the NATS verify port) so that a benchmark can model a device honestly and
reproducibly on any host.

The profiles' numbers and files are `services.edge_drafter.profiles` (re-exported here for
existing callers); the preset profiles are illustrative assumptions for experiments, not
measurements of real devices; pass explicit numbers (or your own measured profile) for claims
about hardware.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import Callable, Mapping

from common.engine.session import DraftPort
from common.errors import ErrorCode, WispError
from common.transport.generation import NatsVerifyPort
from services.edge_drafter.profiles import PROFILES, DeviceProfile, get_profile, load_profiles

__all__ = ["PROFILES", "DeviceProfile", "EmulatedDrafter", "GapSchedule", "LinkEmulator",
           "emulate", "get_profile", "load_profiles"]


class GapSchedule:
    """The connectivity gaps of one link, in seconds since it came up: link-up times drawn
    exponentially with mean `every_s` (so gaps come as a Poisson process that never overlaps
    itself), each gap `length_s` long. Drawn lazily as time goes on, from its own seeded
    generator, so the same seed gives the same gaps whatever else is drawn."""

    def __init__(self, every_s: float, length_s: float, seed: int):
        if not (every_s > 0 and length_s > 0):
            raise ValueError(f"gaps need every_s > 0 and length_s > 0, got {every_s}, "
                             f"{length_s}")
        self.every_s, self.length_s = every_s, length_s
        self._rng = random.Random(f"wisp-gaps:{seed}")
        self._starts: list[float] = []  # gap starts drawn so far, ascending
        self._next_start = self._rng.expovariate(1 / every_s)

    def _draw_past(self, t: float) -> None:
        while self._next_start <= t:
            self._starts.append(self._next_start)
            self._next_start += self.length_s + self._rng.expovariate(1 / self.every_s)

    def gaps(self, until_s: float) -> list[tuple[float, float]]:
        """(start, end) of every gap starting at or before `until_s`."""
        self._draw_past(until_s)
        return [(s, s + self.length_s) for s in self._starts if s <= until_s]

    def hold_s(self, t: float) -> float:
        """How long a message sent at `t` waits for the link: to the end of the gap `t` falls
        in, else 0."""
        self._draw_past(t)
        i = bisect.bisect_right(self._starts, t) - 1
        return max(0.0, self._starts[i] + self.length_s - t) if i >= 0 else 0.0


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class LinkEmulator:
    """Per-session delays for one profile; seeded so a run can be repeated exactly.

    A delay is asked for at the moment a message is sent (`now`, default `clock()`: the event
    loop's time): the uplink's before a round goes out, the downlink's when the reply comes in
    (when the server sent it). A message sent during a connectivity gap is held to the gap's
    end, then takes its usual one-way time; the gaps' clock starts at the session's first
    message."""

    def __init__(self, profile: DeviceProfile, seed: int,
                 clock: Callable[[], float] = _loop_time):
        self.profile = profile
        self._rng = random.Random(seed)  # jitter; the gaps draw from their own generator
        self._gaps = (GapSchedule(profile.gap_every_s, profile.gap_s, seed)
                      if profile.has_gaps else None)
        self._clock = clock
        self._up_since: float | None = None

    @property
    def uplink_ms(self) -> float:
        """The edge's estimate of its one-way time to the server (for round budgets)."""
        return self.profile.rtt_ms / 2

    def draft_delay_s(self, num_tokens: int, measured_s: float) -> float:
        """Extra wait so drafting `num_tokens` takes as long as on the emulated device."""
        if not self.profile.draft_ms_per_token:
            return 0.0
        return max(0.0, num_tokens * self.profile.draft_ms_per_token / 1e3 - measured_s)

    def uplink_delay_s(self, num_bytes: int, now: float | None = None) -> float:
        return self.gap_hold_s(now) + self._one_way_s(num_bytes, self.profile.uplink_kbps)

    def downlink_delay_s(self, num_bytes: int, now: float | None = None) -> float:
        return self.gap_hold_s(now) + self._one_way_s(num_bytes, self.profile.downlink_kbps)

    def gap_hold_s(self, now: float | None = None) -> float:
        """How long a message sent at `now` waits for a connectivity gap to end (0: none)."""
        if self._gaps is None:
            return 0.0
        now = self._clock() if now is None else now
        if self._up_since is None:
            self._up_since = now
        return self._gaps.hold_s(now - self._up_since)

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


def emulate(default_profile: DeviceProfile | None,
            profiles: Mapping[str, DeviceProfile] | None = None):
    """The edge's emulation hook for `GenerationServer`: a request's named profile (looked up
    in `profiles`, default the presets; or the process's default) shapes that session's
    ports; an unknown name is a BAD_REQUEST listing the known ones."""

    def wrap(name: str | None, sid: str, verifier: NatsVerifyPort,
             drafter: DraftPort | None) -> tuple[NatsVerifyPort, DraftPort | None]:
        try:
            profile = get_profile(name, profiles) if name else default_profile
        except ValueError as exc:
            raise WispError(ErrorCode.BAD_REQUEST, str(exc)) from None
        if profile is None:
            return verifier, drafter
        link = LinkEmulator(profile, seed=int(sid[:16], 16))
        verifier.link = link
        return verifier, EmulatedDrafter(drafter, link) if drafter is not None else None

    return wrap
