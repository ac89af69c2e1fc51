"""Draft-length policies: how many tokens an edge drafts before asking for a verdict.

A policy decides for a whole draft step of many sessions at once: the drafter core hands it
the step's `DraftStep` (session ids [B], positions [B], features [B, F]) and gets a mask [B]
back of the sessions whose token just drafted is their round's last, so a model-backed policy (WISP's rejection predictor, an ONNX session) runs once per
step for the whole batch rather than once per token. One policy object serves every session
that names it; state it keeps per session or per device (a bandit's arms, a delay estimate) is
its own, opened and closed with the sessions. Its dependencies (a predictor, a clock) are
objects given to its constructor, so a test hands it fakes and a service hot-swaps them.

`PolicyCatalog` is what a process offers: policies by spec (``fixed``, ``fixed:4``), each
built once from its own arguments, and the default spec of each mode it serves.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import structlog
import torch

from common.errors import ErrorCode, WispError
from common.protocol import DRAFT_FEATURES

if TYPE_CHECKING:
    from common.engine.predictor.runtime import OnnxPredictor, PredictorSlot

__all__ = [
    "ConfidenceStop",
    "DraftPolicy",
    "DraftStep",
    "FixedK",
    "PolicyCatalog",
    "PolicySession",
    "PredictorStop",
    "RoundFeedback",
]

log = structlog.get_logger(__name__)

_CONFIDENCE = DRAFT_FEATURES.index("confidence")


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
    """Base: no per-token stopping, a round limit of each session's k_max, no learning.

    A per-token rule ends a round *after* the token it judged: that token's draft step has run
    anyway, so it is sent (free to verify alongside the others, and accepted now and then)
    rather than dropped; what the rule saves is the steps after it."""

    name: ClassVar[str] = "policy"

    def __init__(self) -> None:
        self.sessions: dict[str, PolicySession] = {}
        self.spec = self.name  # how it was asked for ("fixed:4"); the catalog sets it

    def open(self, session: PolicySession) -> None:
        self.sessions[session.sid] = session

    def close(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def round_limits(self, sids: list[str]) -> list[int]:
        """Most tokens each session may draft this round (the core also caps by k_max and by
        the room left)."""
        return [self.sessions[sid].k_max for sid in sids]

    def last(self, step: DraftStep) -> torch.Tensor:
        """[B] bool: True ends that session's round with the token just drafted (sent)."""
        return torch.zeros(len(step.sids), dtype=torch.bool)

    def observe(self, feedback: RoundFeedback) -> None:
        """The verdict of a round this policy drafted."""

    def version_for(self, sid: str) -> str | None:
        """The model version behind this session's current round (None: no model)."""
        return None

    def censors(self, sid: str) -> bool:
        """Whether a rule reading the draft features may have ended this session's current
        round (then its verdict is no fair training sample for the rejection predictor)."""
        return False


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


def _probability(arg: str, what: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} needs a threshold in (0, 1], got {arg!r}")
    return value


class ConfidenceStop(DraftPolicy):
    """End the round at the first token whose draft confidence (top-1 probability) is below
    τ (that token included)."""

    name = "confidence"

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    @classmethod
    def from_arg(cls, arg: str) -> ConfidenceStop:
        return cls(_probability(arg, "confidence:τ"))

    def last(self, step: DraftStep) -> torch.Tensor:
        return step.features[:, _CONFIDENCE] < self.tau

    def censors(self, sid: str) -> bool:
        return True


class PredictorStop(DraftPolicy):
    """WISP: end the round at the first token the rejection predictor scores at or above the
    threshold (the model's own operating threshold unless one is given), that token included.

    The model comes from a `PredictorSlot` that a service may swap at any time; each session
    takes the slot's model when its round starts (`round_limits`) and keeps it for the round,
    so a swap lands between rounds. With no model in the slot it drafts k_max (fixed k).

    `explore`: the share of rounds drafted to k_max without the model (a seeded draw). Their
    verdicts label every token, including those the model would have stopped at, so the
    predictor service can keep learning from uncensored live data."""

    name = "predictor"

    def __init__(self, slot: PredictorSlot, threshold: float | None = None,
                 explore: float = 0.0, seed: int = 0):
        super().__init__()
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.slot = slot
        self.threshold = threshold
        self.explore = explore
        self._rng = random.Random(seed)
        self._round_model: dict[str, OnnxPredictor | None] = {}  # sid -> model of its round
        self._warned_missing = False

    def close(self, sid: str) -> None:
        super().close(sid)
        self._round_model.pop(sid, None)

    def round_limits(self, sids: list[str]) -> list[int]:
        model = self.slot.current
        if model is None and not self._warned_missing:
            log.warning("predictor_missing", fallback="fixed k_max")
            self._warned_missing = True
        for sid in sids:
            exploring = self.explore and self._rng.random() < self.explore
            self._round_model[sid] = None if exploring else model
        return super().round_limits(sids)

    def last(self, step: DraftStep) -> torch.Tensor:
        last = torch.zeros(len(step.sids), dtype=torch.bool)
        groups: dict[int, tuple[OnnxPredictor, list[int]]] = {}
        for row, sid in enumerate(step.sids):
            model = self._round_model.get(sid)
            if model is not None:
                groups.setdefault(id(model), (model, []))[1].append(row)
        features = step.features.numpy()  # [B, F]
        for model, rows in groups.values():
            p_reject = model.predict(features[rows])  # [b]
            threshold = self.threshold if self.threshold is not None else model.threshold
            last[rows] = torch.from_numpy(p_reject >= threshold)
        return last

    def version_for(self, sid: str) -> str | None:
        model = self._round_model.get(sid)
        return model.version if model is not None else None

    def censors(self, sid: str) -> bool:
        return self._round_model.get(sid) is not None


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
    def standard(cls, modes: tuple[str, ...] = ("sled",),
                 predictor: PredictorSlot | None = None,
                 explore: float = 0.0) -> PolicyCatalog:
        """The policies a drafting process offers: fixed[:k], confidence:τ, ucb[:args] and,
        given a predictor slot, predictor[:threshold]. Each mode in `modes` is served by its
        default: sled, colocated -> fixed (k_max a round); ucb -> ucb; wisp -> predictor
        (only with a slot), exploring `explore` of its rounds (`PredictorStop`)."""
        from common.engine.ucb import UcbSpecStop

        builders: dict[str, PolicyBuilder] = {
            FixedK.name: FixedK.from_arg,
            ConfidenceStop.name: ConfidenceStop.from_arg,
            UcbSpecStop.name: UcbSpecStop.from_arg,
        }
        if predictor is not None:
            def build_predictor(arg: str) -> PredictorStop:
                return PredictorStop(
                    predictor, _probability(arg, "predictor[:threshold]") if arg else None,
                    explore=explore)

            builders[PredictorStop.name] = build_predictor
        defaults = {"sled": FixedK.name, "colocated": FixedK.name, "ucb": UcbSpecStop.name,
                    "wisp": PredictorStop.name}
        unknown = [m for m in modes if m not in defaults]
        if unknown:
            raise ValueError(f"no draft policy for modes {unknown}")
        return cls(builders, {m: defaults[m] for m in modes
                              if defaults[m] in builders})

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
            policy.spec = spec
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
