"""Draft-length policies: how many tokens an edge drafts before asking for a verdict.

A policy decides for a whole draft step of many sessions at once: the drafter core hands it
the step's `DraftStep` (session ids [B], positions [B], features [B, F]) and gets a keep mask
[B] back, so a model-backed policy (WISP's rejection predictor, an ONNX session) runs once per
step for the whole batch rather than once per token. One policy object serves every session
that names it; state it keeps per session or per device (a bandit's arms, a delay estimate) is
its own, opened and closed with the sessions. Its dependencies (a predictor, a clock) are
objects given to its constructor, so a test hands it fakes and a service hot-swaps them.

`PolicyCatalog` is what a process offers: policies by spec (``fixed``, ``fixed:4``), each
built once from its own arguments, and the default spec of each mode it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.errors import ErrorCode, WispError

__all__ = [
    "DraftPolicy",
    "DraftStep",
    "FixedK",
    "PolicyCatalog",
    "PolicySession",
    "RoundFeedback",
]


@dataclass(slots=True, frozen=True)
class PolicySession:
    """What a policy knows of a session it serves."""

    sid: str
    device_id: str
    k_max: int  # the session's own cap on a round's draft


@dataclass(slots=True)
class DraftStep:
    """One draft step of the sessions (sharing one policy) that drafted a token in it."""

    sids: list[str]  # [B]
    positions: torch.Tensor  # [B] int64: index of the token just drafted within its draft
    features: torch.Tensor  # [B, F] float32, columns common.protocol.DRAFT_FEATURES


@dataclass(slots=True)
class RoundFeedback:
    """The verdict on one session's round, for learning policies."""

    sid: str
    num_drafted: int
    num_accepted: int
    features: torch.Tensor  # [k, F] of the drafted tokens
    draft_time_s: float
    round_trip_s: float | None  # submit -> verdict, as the edge measured it


class DraftPolicy:
    """Base: no per-token stopping, a round limit of each session's k_max, no learning."""

    name: ClassVar[str] = "policy"

    def __init__(self) -> None:
        self.sessions: dict[str, PolicySession] = {}

    def open(self, session: PolicySession) -> None:
        self.sessions[session.sid] = session

    def close(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def round_limits(self, sids: list[str]) -> list[int]:
        """Most tokens each session may draft this round (the core also caps by k_max and by
        the room left)."""
        return [self.sessions[sid].k_max for sid in sids]

    def keep(self, step: DraftStep) -> torch.Tensor:
        """[B] bool: False drops that session's token just drafted and ends its round."""
        return torch.ones(len(step.sids), dtype=torch.bool)

    def observe(self, feedback: RoundFeedback) -> None:
        """The verdict of a round this policy drafted."""


class FixedK(DraftPolicy):
    """SLED-style fixed draft length: k tokens a round (None: the session's k_max)."""

    name = "fixed"

    def __init__(self, k: int | None = None):
        super().__init__()
        if k is not None and k < 0:
            raise ValueError(f"fixed k must be >= 0, got {k}")
        self.k = k

    @classmethod
    def from_arg(cls, arg: str) -> FixedK:
        try:
            return cls(int(arg) if arg else None)
        except ValueError:
            raise ValueError(f"fixed[:k] needs an integer k >= 0, got {arg!r}") from None

    def round_limits(self, sids: list[str]) -> list[int]:
        limits = super().round_limits(sids)
        return limits if self.k is None else [min(self.k, n) for n in limits]


PolicyBuilder = Callable[[str], DraftPolicy]  # the text after "name:" -> a policy


class PolicyCatalog:
    """Policies by spec (``name`` or ``name:arg``), built on first use and shared after; and
    the default spec of each mode this process serves (a mode without one is not served)."""

    def __init__(self, builders: Mapping[str, PolicyBuilder], mode_defaults: Mapping[str, str]):
        self._builders = dict(builders)
        self.mode_defaults = dict(mode_defaults)
        self._built: dict[str, DraftPolicy] = {}
        for spec in self.mode_defaults.values():
            self.get(spec)  # a bad default fails at start, not at the first session

    @classmethod
    def standard(cls, modes: tuple[str, ...] = ("sled",)) -> PolicyCatalog:
        """The policies every drafting process offers today (fixed[:k]), serving `modes` with
        k_max tokens a round: an edge serves `sled`, the scheduler `colocated`."""
        return cls({FixedK.name: FixedK.from_arg}, dict.fromkeys(modes, FixedK.name))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.mode_defaults)

    def get(self, spec: str) -> DraftPolicy:
        policy = self._built.get(spec)
        if policy is None:
            name, _, arg = spec.partition(":")
            builder = self._builders.get(name)
            if builder is None:
                raise ValueError(f"unknown draft policy {spec!r}; available: "
                                 + ", ".join(f"'{n}'" for n in sorted(self._builders)))
            policy = self._built[spec] = builder(arg)
        return policy

    def for_session(self, mode: str, spec: str | None) -> DraftPolicy:
        """The policy a session of `mode` asked for (its mode's default if None);
        BAD_REQUEST for an unknown spec or a mode without a default here."""
        if mode not in self.mode_defaults:
            raise WispError(ErrorCode.BAD_REQUEST,
                            f"mode {mode!r} is not served here; served: {list(self.modes)}")
        try:
            return self.get(spec or self.mode_defaults[mode])
        except ValueError as exc:
            raise WispError(ErrorCode.BAD_REQUEST, str(exc)) from None
