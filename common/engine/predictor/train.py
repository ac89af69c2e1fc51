"""Train the rejection predictor, compare it with simpler rules, pick its operating threshold.

Three scorers, each giving the probability-like score that a drafted token is rejected:
the WISP MLP, logistic regression (the same model without hidden layers) and a fixed
confidence threshold (score = 1 - the draft's confidence, no training). Each is fitted on the
training rows, its threshold is chosen on a validation part of them (whole rounds) by the
expected round cost per committed token under a `CostModel` (not by accuracy: a false alarm
costs a round trip, a miss costs draft steps, and their prices are the deployment's), and it is
judged on held-out rows it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.engine.predictor.cost import CostModel, classification, replay
from common.engine.predictor.model import RejectionModel, TrainSettings, fit
from common.engine.predictor.pairs import PairSet
from common.protocol import DRAFT_FEATURES

__all__ = ["Candidate", "choose_threshold", "evaluate", "fit_candidate", "score"]

_CONFIDENCE = DRAFT_FEATURES.index("confidence")
NEVER = 2.0  # a threshold no probability reaches: the rule never stops (fixed k_max)


@dataclass(slots=True)
class Candidate:
    kind: str  # "mlp" | "logreg" | "confidence"
    model: RejectionModel | None  # None for "confidence"
    threshold: float
    val_cost_ms: float  # per committed token on the validation rounds, at `threshold`


def score(kind: str, model: RejectionModel | None, pairs: PairSet) -> np.ndarray:
    """[N] rejection scores of `pairs` rows."""
    if kind == "confidence":
        return 1.0 - pairs.features[:, _CONFIDENCE]
    assert model is not None
    return model.predict(pairs.features)


def choose_threshold(scores: np.ndarray, pairs: PairSet, cost: CostModel) -> tuple[float, float]:
    """(threshold, cost_ms per committed token): the cheapest of a grid over the scores'
    quantiles, never-stop included (so the choice is never worse than fixed k_max here), among
    those within the cost model's round cap on greedy and on sampled rounds alike (each kind
    of traffic, not only their mix, stays within it)."""
    grid = np.unique(np.concatenate([np.quantile(scores, np.linspace(0.02, 0.98, 49)),
                                     np.linspace(0.05, 0.95, 19)]))
    grid = grid[(grid > 0.0) & (grid <= 1.0)]
    groups = [g for g in (pairs.temperature == 0, pairs.temperature > 0) if g.any()]
    fixed_rounds = [replay(pairs.select(g), scores[g], NEVER, cost).per_committed(cost)["rounds"]
                    for g in groups]

    def within_cap(t: float) -> bool:
        if not cost.max_rounds_ratio:
            return True
        return all(replay(pairs.select(g), scores[g], t, cost).per_committed(cost)["rounds"]
                   <= cost.max_rounds_ratio * base for g, base in zip(groups, fixed_rounds,
                                                                     strict=True))

    best = (NEVER, replay(pairs, scores, NEVER, cost).per_committed(cost)["cost_ms"])
    for t in grid:
        c = replay(pairs, scores, float(t), cost).per_committed(cost)["cost_ms"]
        if c < best[1] - 1e-9 and within_cap(float(t)):
            best = (float(t), c)
    return best


def fit_candidate(kind: str, train: PairSet, cost: CostModel,
                  settings: TrainSettings | None = None, val_frac: float = 0.2,
                  seed: int = 0) -> Candidate:
    """Fit `kind` on most of `train`'s rounds and choose its threshold on the rest."""
    settings = settings or TrainSettings()
    fit_rows, val_rows = train.split_rounds(val_frac, seed)
    if not len(fit_rows) or not len(val_rows):
        raise ValueError(f"too few rounds to fit and validate ({len(train)} rows)")
    model = None
    if kind != "confidence":
        hidden = (32, 16) if kind == "mlp" else ()
        model = fit(RejectionModel(len(train.feature_names), hidden), fit_rows.features,
                    fit_rows.accepted, settings)
    threshold, val_cost = choose_threshold(score(kind, model, val_rows), val_rows, cost)
    if kind != "confidence":
        # Refit on every training row now that the threshold is chosen: the held-out rows
        # judge it either way, and the validation rows are better spent on the fit.
        model = fit(model, train.features, train.accepted, settings)
    return Candidate(kind, model, threshold, val_cost)


def evaluate(candidate: Candidate, pairs: PairSet, cost: CostModel) -> dict:
    """The candidate at its threshold on `pairs`: classification, the replayed rounds, and the
    ratios of its per-committed-token numbers to never stopping (fixed k_max)."""
    scores = score(candidate.kind, candidate.model, pairs)
    mine = replay(pairs, scores, candidate.threshold, cost)
    fixed = replay(pairs, scores, NEVER, cost)
    ours, theirs = mine.per_committed(cost), fixed.per_committed(cost)
    return {
        "rows": len(pairs),
        "classification": {k: round(v, 4) for k, v in
                           classification(pairs.accepted, scores, candidate.threshold).items()},
        "rounds": mine.as_dict(cost),
        "fixed_k_max": fixed.as_dict(cost),
        "vs_fixed_k_max": {k: round(ours[k] / theirs[k], 4) if theirs[k] else None
                           for k in ours},
    }
