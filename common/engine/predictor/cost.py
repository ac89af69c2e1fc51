"""The offline cost of a stopping rule, replayed on fixed-length rounds (WISP, Theorem 1).

A rule ends a round at its first token scored at or above the threshold, that token included:
its draft step has run, so it is sent with the tokens before it (dropping it would waste the
step for certain; sent, it is accepted when the score was a false alarm). Replaying this on
rounds drafted to k_max gives, per round, the steps run (= the tokens sent), the tokens
accepted (min of sent and the round's accepted run) and the tokens committed (accepted + the
target's own). Costs are renewal-reward ratios over all rounds:
E[cost of a round] / E[tokens committed by a round], with a round costing
steps x draft_step_ms + rtt_ms + verify_ms (`CostModel`).

The approximation: the next round starts where this one would have, not where the replayed
rule would have put it; rounds are i.i.d. draws in this model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.engine.predictor.pairs import PairSet

__all__ = ["Confusion", "CostModel", "Replay", "classification", "replay"]


@dataclass(slots=True, frozen=True)
class CostModel:
    """What a round costs the edge, in ms: each draft step, the round trip, the verify; and
    the server's share: a rule may make at most `max_rounds_ratio` times the rounds per
    committed token of fixed k_max (0: no cap). The edge's price of a round is its wait; the
    verifier pays for every round it runs for every device it serves, which the edge's cost
    does not see, so the threshold choice caps it."""

    draft_step_ms: float = 25.0
    rtt_ms: float = 60.0
    verify_ms: float = 20.0
    max_rounds_ratio: float = 1.4

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True, frozen=True)
class Replay:
    """Per-round means of a stopping rule replayed on a pair set's rounds."""

    rounds: int
    steps: float  # draft steps run per round
    accepted: float  # accepted per round
    cost_ms: float  # per round, under the cost model

    @property
    def drafted(self) -> float:
        """Tokens sent per round: every step's token is."""
        return self.steps

    @property
    def committed(self) -> float:
        """Accepted + the target's own token, per round."""
        return self.accepted + 1.0

    @property
    def wasted_steps(self) -> float:
        """Steps whose token was not accepted, per round."""
        return self.steps - self.accepted

    def per_committed(self, cost: CostModel) -> dict[str, float]:
        c = self.committed or 1.0
        return {
            "wasted_tokens": self.wasted_steps / c,
            "wdt_ms": self.wasted_steps * cost.draft_step_ms / c,
            "draft_ms": self.steps * cost.draft_step_ms / c,
            "rounds": 1.0 / c,
            "cost_ms": self.cost_ms / c,
        }

    def as_dict(self, cost: CostModel) -> dict:
        fields = asdict(self) | {"drafted": self.drafted, "committed": self.committed,
                                 "wasted_steps": self.wasted_steps}
        out = {k: round(float(v), 4) for k, v in fields.items()}
        out["per_committed"] = {k: round(v, 4) for k, v in self.per_committed(cost).items()}
        return out


def replay(pairs: PairSet, scores: np.ndarray, threshold: float, cost: CostModel) -> Replay:
    """scores [N] (probability of rejection per row) -> the rule "end the round with the first
    row scored >= threshold" replayed on every round of `pairs`."""
    starts = pairs.round_starts()  # [R + 1]
    rounds = len(starts) - 1
    if rounds == 0:
        return Replay(0, 0.0, 0.0, cost.rtt_ms + cost.verify_ms)
    stop = scores >= threshold  # [N]
    steps = np.empty(rounds)  # = tokens sent
    accepted = np.empty(rounds)
    for r in range(rounds):
        lo, hi = starts[r], starts[r + 1]
        hit = np.flatnonzero(stop[lo:hi])
        k = hi - lo
        sent = int(hit[0]) + 1 if len(hit) else k
        steps[r] = sent
        accepted[r] = min(sent, int(pairs.accepted[lo:hi].sum()))
    round_cost = steps * cost.draft_step_ms + cost.rtt_ms + cost.verify_ms
    return Replay(rounds, steps.mean(), accepted.mean(), round_cost.mean())


@dataclass(slots=True)
class Confusion:
    """Counts of "predicted rejected" (score >= threshold) against the verdict; rejection is
    the positive class. Offline (`classification`) and live (the predictor service, adding
    and removing rounds as its window slides) count the same way."""

    tp: int = 0  # predicted rejected, rejected
    fp: int = 0  # predicted rejected, accepted: a false alarm
    fn: int = 0  # predicted accepted, rejected
    tn: int = 0

    def add(self, predicted: np.ndarray, accepted: np.ndarray, sign: int = 1) -> None:
        rejected = ~accepted
        self.tp += sign * int((predicted & rejected).sum())
        self.fp += sign * int((predicted & accepted).sum())
        self.fn += sign * int((~predicted & rejected).sum())
        self.tn += sign * int((~predicted & accepted).sum())

    @property
    def rows(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def rates(self) -> dict[str, float] | None:
        """Precision and recall of "predicted rejected" and the false-alarm rate (accepted
        tokens predicted rejected / accepted tokens, the rate Theorem 1 ties to wasted
        drafting); an empty denominator reads as no error (1, 1, 0). None with no rows."""
        if not self.rows:
            return None
        accepted = self.fp + self.tn
        return {"precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0,
                "recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0,
                "false_alarm": self.fp / accepted if accepted else 0.0}


def classification(labels_accepted: np.ndarray, scores: np.ndarray,
                   threshold: float) -> dict[str, float]:
    """`Confusion.rates` of the rows (scored `scores`, threshold `threshold`), plus accuracy."""
    counts = Confusion()
    counts.add(scores >= threshold, labels_accepted)
    if not counts.rows:
        return {"precision": 1.0, "recall": 1.0, "false_alarm": 0.0, "accuracy": 0.0}
    return counts.rates() | {"accuracy": (counts.tp + counts.tn) / counts.rows}
