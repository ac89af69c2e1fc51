"""Draft-length policies: how many tokens an edge device drafts before asking for a verdict.

A policy object belongs to one session (learning policies keep per-session state). The drafter
asks `round_limit()` at the start of a round, `keep(position, features)` after each drafted
token (False drops that token and ends the round), and reports the verdict with `observe`.
WISP's predictor policy and UCB-SpecStop implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from services.edge_drafter.features import TokenFeatures


@dataclass(slots=True)
class RoundFeedback:
    num_drafted: int
    num_accepted: int
    features: list[TokenFeatures] = field(default_factory=list)  # one per drafted token
    draft_time_s: float = 0.0
    round_trip_s: float | None = None  # submit -> verdict, as the edge measured it


class DraftPolicy(ABC):
    name: str = "policy"

    def __init__(self, k_max: int):
        if k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        self.k_max = k_max

    @abstractmethod
    def round_limit(self) -> int:
        """Most tokens to draft this round (0 <= limit <= k_max)."""

    def keep(self, position: int, features: TokenFeatures) -> bool:
        """Called after drafting the token at `position` (0-based); False drops it and stops."""
        return True

    def observe(self, feedback: RoundFeedback) -> None:
        """The verdict of the round just drafted."""


class FixedK(DraftPolicy):
    """SLED-style fixed draft length."""

    name = "fixed"

    def __init__(self, k: int, k_max: int | None = None):
        super().__init__(k if k_max is None else k_max)
        if not 0 <= k <= self.k_max:
            raise ValueError(f"fixed k must be within [0, k_max={self.k_max}], got {k}")
        self.k = k

    def round_limit(self) -> int:
        return self.k


PolicyFactory = Callable[[], DraftPolicy]


def policy_factory(spec: str, k_max: int) -> PolicyFactory:
    """Parse a policy spec such as 'fixed' (k = k_max) or 'fixed:4'."""
    name, _, arg = spec.partition(":")
    if name == "fixed":
        k = int(arg) if arg else k_max
        FixedK(k, k_max)  # validate now, not at the first session
        return lambda: FixedK(k, k_max)
    raise ValueError(f"unknown draft policy {spec!r}; available: 'fixed[:k]'")
