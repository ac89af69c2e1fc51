"""(features, label) pairs of drafted tokens: what the rejection predictor learns from.

A row is one drafted token: its feature row (columns `common.protocol.DRAFT_FEATURES`, what
the edge's policy saw) and whether the target accepted it in its round. A token after the
round's first rejection counts as rejected: its drafting time was wasted whatever its own
distribution looked like, and a live verdict (`VerdictEvent`: features + num_accepted) tells
exactly this, so offline collection and live traffic give the same labels.

Rows of one round are contiguous and in draft order (`round_id` marks them), which lets
`common.engine.predictor.cost` replay a stopping rule on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.protocol import DRAFT_FEATURES

__all__ = ["DOMAINS", "PairSet"]

DOMAINS = ("code", "prose", "live")


@dataclass(slots=True)
class PairSet:
    features: np.ndarray  # [N, F] float32, columns `feature_names`
    accepted: np.ndarray  # [N] bool
    round_id: np.ndarray  # [N] int64, equal and contiguous within a round
    domain: np.ndarray  # [N] int8, index into DOMAINS
    temperature: np.ndarray  # [N] float32, 0 = greedy
    feature_names: tuple[str, ...] = DRAFT_FEATURES

    def __post_init__(self) -> None:
        n = len(self.accepted)
        if self.features.shape != (n, len(self.feature_names)):
            raise ValueError(f"features {self.features.shape} for {n} rows of "
                             f"{len(self.feature_names)} features")
        for name in ("round_id", "domain", "temperature"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.accepted)

    @classmethod
    def empty(cls) -> PairSet:
        return cls(np.zeros((0, len(DRAFT_FEATURES)), np.float32), np.zeros(0, bool),
                   np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.float32))

    @classmethod
    def from_rounds(cls, rounds: list[tuple[list[list[float]], int]], domain: str,
                    temperature: float, first_round_id: int = 0) -> PairSet:
        """rounds: (feature rows [k][F], num_accepted) each; rounds with k = 0 add no rows."""
        feats, labels, ids = [], [], []
        for i, (rows, num_accepted) in enumerate(rounds):
            feats.extend(rows)
            labels.extend(j < num_accepted for j in range(len(rows)))
            ids.extend([first_round_id + i] * len(rows))
        n = len(labels)
        return cls(np.asarray(feats, np.float32).reshape(n, len(DRAFT_FEATURES)),
                   np.asarray(labels, bool), np.asarray(ids, np.int64),
                   np.full(n, DOMAINS.index(domain), np.int8),
                   np.full(n, temperature, np.float32))

    @staticmethod
    def concat(sets: list[PairSet]) -> PairSet:
        """Round ids are renumbered so rounds of different sets never merge."""
        sets = [s for s in sets if len(s)] or [PairSet.empty()]
        names = {s.feature_names for s in sets}
        if len(names) > 1:
            raise ValueError(f"pair sets with different features: {sorted(names)}")
        ids, offset = [], 0
        for s in sets:
            _, dense = np.unique(s.round_id, return_inverse=True)
            ids.append(dense.astype(np.int64) + offset)
            offset += int(dense.max()) + 1 if len(dense) else 0
        return PairSet(np.concatenate([s.features for s in sets]),
                       np.concatenate([s.accepted for s in sets]), np.concatenate(ids),
                       np.concatenate([s.domain for s in sets]),
                       np.concatenate([s.temperature for s in sets]), sets[0].feature_names)

    def select(self, mask: np.ndarray) -> PairSet:
        """Rows where `mask` [N] bool holds; select whole rounds to keep `cost` meaningful."""
        return PairSet(self.features[mask], self.accepted[mask], self.round_id[mask],
                       self.domain[mask], self.temperature[mask], self.feature_names)

    def of_domain(self, domain: str) -> PairSet:
        return self.select(self.domain == DOMAINS.index(domain))

    def split_rounds(self, frac: float, seed: int) -> tuple[PairSet, PairSet]:
        """(rest, held) with about `frac` of the rounds held out, chosen by a seeded draw."""
        ids = np.unique(self.round_id)
        held = np.random.default_rng(seed).random(len(ids)) < frac
        mask = np.isin(self.round_id, ids[held])
        return self.select(~mask), self.select(mask)

    def round_starts(self) -> np.ndarray:
        """[R + 1] int64: row offsets of the rounds, then N."""
        if not len(self):
            return np.zeros(1, np.int64)
        change = np.flatnonzero(np.diff(self.round_id)) + 1
        return np.concatenate([[0], change, [len(self)]]).astype(np.int64)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, features=self.features, accepted=self.accepted,
                            round_id=self.round_id, domain=self.domain,
                            temperature=self.temperature,
                            feature_names=np.asarray(self.feature_names))

    @classmethod
    def load(cls, path: str | Path) -> PairSet:
        with np.load(path, allow_pickle=False) as z:
            names = tuple(str(x) for x in z["feature_names"])
            if names != DRAFT_FEATURES:
                raise ValueError(f"{path}: features {names} are not this build's "
                                 f"{DRAFT_FEATURES}; collect again")
            return cls(z["features"].astype(np.float32), z["accepted"].astype(bool),
                       z["round_id"].astype(np.int64), z["domain"].astype(np.int8),
                       z["temperature"].astype(np.float32), names)
