"""UCB-SpecStop: a per-device bandit that learns each round's draft length online.

After Sun et al., "Delay-Adaptive Speculation Control for Low-Latency Edge-Cloud LLM Inference":
the best draft length is a threshold that grows with the network delay, and an upper confidence
bound bandit over candidate lengths finds it knowing neither the delay nor the acceptance rate.

Arms are draft lengths (tokens). At `round_limits` each session's device picks the eligible arm
(<= the session's k_max) with the highest upper bound; the session drafts that many tokens
(`keep` keeps every token: the length is the stopping rule). The reward of a round is its
measured throughput, committed tokens per second of the round:
    (num_accepted + 1) / (draft_time_s + round_trip_s)
Rewards are divided by the device's best current arm mean before the bonus is added, so the
exploration constant `c` is unit-free.

Non-stationary: discounted UCB (Garivier & Moulines). Every update multiplies all of the
device's arm counts and sums by `gamma`, so evidence fades over about 1 / (1 - gamma) rounds.
A memory long enough to tell lengths apart (throughput differs by a few % near the optimum,
a round's reward by ~50%) is too long to follow a jump in the delay: every arm's old mean is
then off by the same factor, and until washed out the stale arms look best. So a detector
tracks the EWMA of reward / (played arm's mean) - 1 and, past +-DRIFT_RESET, forgets the device
and re-explores: a jump is followed within some tens of rounds, drift by the discount.
State is per device: a device's later sessions start from what its earlier ones learned.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import ClassVar

from common.engine.policies import DraftPolicy, RoundFeedback

__all__ = ["UcbSpecStop"]

DEFAULT_ARMS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass(slots=True)
class _Device:
    """One device's discounted statistics, indexed like the policy's arms."""

    rng: random.Random  # tie-breaks
    counts: list[float]  # [A] discounted rounds played with each arm (0: untried)
    sums: list[float]  # [A] discounted sum of their rewards (tokens / s)
    drift: float = 0.0  # EWMA of reward / (played arm's mean) - 1

    def mean(self, i: int) -> float:
        return self.sums[i] / self.counts[i] if self.counts[i] > 0 else 0.0

    def forget(self) -> None:
        self.counts, self.sums, self.drift = [0.0] * len(self.counts), [0.0] * len(self.sums), 0.0


class UcbSpecStop(DraftPolicy):
    """Discounted-UCB choice of each round's draft length, learned per device."""

    name = "ucb"
    DRIFT_WEIGHT: ClassVar[float] = 0.05  # EWMA weight of the level-shift detector
    DRIFT_RESET: ClassVar[float] = 0.4  # |drift| beyond this: forget the device, re-explore

    def __init__(self, arms: tuple[int, ...] = DEFAULT_ARMS, gamma: float = 0.995,
                 c: float = 0.3, seed: int = 0):
        super().__init__()
        arms = tuple(sorted(set(arms)))
        if not arms or arms[0] < 1:
            raise ValueError(f"ucb arms must be draft lengths >= 1, got {arms}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"ucb gamma must be in (0, 1], got {gamma}")
        if c < 0:
            raise ValueError(f"ucb c must be >= 0, got {c}")
        self.arms, self.gamma, self.c, self.seed = arms, gamma, c, seed
        self.devices: dict[str, _Device] = {}
        self.playing: dict[str, int] = {}  # sid -> index into arms of its round's length

    @classmethod
    def from_arg(cls, arg: str) -> UcbSpecStop:
        """``gamma=0.99,c=0.3,seed=3,arms=1/2/4/8``: any subset, any order ("" = defaults)."""
        parsers = {"gamma": float, "c": float, "seed": int,
                   "arms": lambda v: tuple(int(a) for a in v.split("/"))}
        kwargs = {}
        for part in filter(None, (p.strip() for p in arg.split(","))):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or key not in parsers:
                raise ValueError(f"ucb: bad argument {part!r}; expected key=value, key one of "
                                 "gamma, c, seed, arms (e.g. ucb:gamma=0.99,arms=1/2/4/8)")
            try:
                kwargs[key] = parsers[key](value)
            except ValueError:
                raise ValueError(f"ucb: bad value in {part!r}") from None
        return cls(**kwargs)

    def _device(self, device_id: str) -> _Device:
        dev = self.devices.get(device_id)
        if dev is None:
            rng = random.Random((self.seed << 32) ^ zlib.crc32(device_id.encode()))
            n = len(self.arms)
            dev = self.devices[device_id] = _Device(rng, [0.0] * n, [0.0] * n)
        return dev

    def close(self, sid: str) -> None:
        super().close(sid)
        self.playing.pop(sid, None)

    def round_limits(self, sids: list[str]) -> list[int]:
        return [self._choose(sid) for sid in sids]

    def _choose(self, sid: str) -> int:
        device_id, k_max = self.sessions[sid].device_id, self.sessions[sid].k_max
        dev = self._device(device_id)
        eligible = [i for i, k in enumerate(self.arms) if k <= k_max]
        if not eligible:
            self.playing.pop(sid, None)
            return k_max
        untried = [i for i in eligible if dev.counts[i] == 0]
        if untried:  # each arm once first, shortest first, spread over the device's sessions
            busy = {i for s, i in self.playing.items()
                    if s != sid and s in self.sessions and self.sessions[s].device_id == device_id}
            pick = next((i for i in untried if i not in busy), untried[0])
        else:
            scale = max(dev.mean(i) for i in eligible)  # tokens / s
            log_n = math.log(max(sum(dev.counts), math.e))
            bounds = [dev.mean(i) / scale + self.c * math.sqrt(log_n / dev.counts[i])
                      for i in eligible]  # unit-free
            best = max(bounds)
            pick = dev.rng.choice([i for i, b in zip(eligible, bounds, strict=True) if b == best])
        self.playing[sid] = pick
        return self.arms[pick]

    def observe(self, feedback: RoundFeedback) -> None:
        pick = self.playing.pop(feedback.sid, None)
        session = self.sessions.get(feedback.sid)
        if pick is None or session is None or feedback.round_trip_s is None:
            return
        elapsed = feedback.draft_time_s + feedback.round_trip_s  # seconds
        if elapsed <= 0:
            return
        reward = (feedback.num_accepted + 1) / elapsed  # committed tokens / s
        dev = self._device(session.device_id)
        if dev.counts[pick] >= 2:
            w = self.DRIFT_WEIGHT
            dev.drift = (1 - w) * dev.drift + w * (reward / dev.mean(pick) - 1)
            if abs(dev.drift) > self.DRIFT_RESET:
                dev.forget()
        dev.counts = [self.gamma * n for n in dev.counts]
        dev.sums = [self.gamma * s for s in dev.sums]
        dev.counts[pick] += 1.0
        dev.sums[pick] += reward

    def preferred_length(self, device_id: str) -> int | None:
        """The arm with the highest discounted mean reward for `device_id` (None: no data)."""
        dev = self.devices.get(device_id)
        tried = [i for i in range(len(self.arms)) if dev and dev.counts[i] > 0]
        return self.arms[max(tried, key=dev.mean)] if tried else None
