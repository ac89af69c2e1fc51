"""The predictor service's logic without NATS: live rows, live statistics, when to retrain,
and one retrain with its accept rule.

* `verdict_round` turns a `VerdictEvent` into one live round: its feature rows and labels (a
  drafted token is accepted iff its index < num_accepted; tokens after the first rejection
  count as rejected, as offline).
* `LiveRows` keeps the newest `max_rows` rows, whole rounds, for retraining.
* `LiveStats` scores each round with the model in use and keeps its precision, recall and
  false-alarm rate ("rejected" is the positive class, as `cost.classification`), since that
  model was installed and over the last `window_rows` rows. Its drift **baseline** is the
  false-alarm rate of the first full window after the model was installed: the model's own
  rate on this deployment's traffic, which the offline numbers in its metadata are not.
* `RetrainTriggers` says when a retrain is due: `every_rows` new rows; or `interval_s`
  since the last one with at least `min_rows` new rows; or drift: a full window, all of its
  rows newer than the last retrain, whose false-alarm rate is above the baseline by more
  than `drift_false_alarm`. Every retrain also needs `min_rows` live rows in all.
* `retrain` fits an MLP on the live rows (plus optional offline rows) less a held-out part of
  the live rounds, and judges candidate and current model on that part by the expected cost
  per committed token (`cost.replay`, each at its own threshold; no model = never stop, i.e.
  fixed k_max). **Accept rule**: the candidate is accepted iff its cost is not higher than
  the current model's; a tie goes to the candidate, fitted on fresher traffic.

Censored rounds are left out of both: a round that a feature-reading rule (the predictor, a
confidence threshold) may have cut carries only the tokens that rule let through (the token it
stopped at was dropped, never verified). Scored by that same model such rows show no false
alarm and no recall, and a replay on them cannot credit a candidate for stopping earlier. The
edge marks them (`VerdictEvent.censored`); what is learnt from is the rounds of fixed-length
policies (sled, ucb) and the wisp rounds the edge drafts to k_max without the predictor
(`--predictor-explore`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from common.engine.predictor.cost import Confusion, CostModel, classification, replay
from common.engine.predictor.model import RejectionModel, TrainSettings
from common.engine.predictor.pairs import DOMAINS, PairSet
from common.engine.predictor.runtime import OnnxPredictor
from common.engine.predictor.train import NEVER, fit_candidate, score
from common.protocol import DRAFT_FEATURES, VerdictEvent

__all__ = ["Confusion", "Decision", "LiveRound", "LiveRows", "LiveStats", "RetrainResult",
           "RetrainTriggers", "accepts", "retrain", "verdict_round"]

# A verdict says only whether its round sampled, not at which temperature; pair sets read
# temperature only as 0 (greedy) or > 0 (sampled), so 1.0 stands for "sampled".
SAMPLED_TEMPERATURE = 1.0
_LIVE = DOMAINS.index("live")


@dataclass(slots=True, frozen=True)
class LiveRound:
    features: np.ndarray  # [k, F] float32
    accepted: np.ndarray  # [k] bool
    greedy: bool


def verdict_round(ev: VerdictEvent) -> LiveRound | None:
    """The round's rows and labels; None when the verdict carries no features (the edge sent
    none), no drafted token, or is censored (see the module's docstring)."""
    if not ev.draft_features or ev.num_drafted == 0 or ev.censored:
        return None
    features = np.asarray(ev.draft_features, np.float32).reshape(-1, len(DRAFT_FEATURES))
    return LiveRound(features, np.arange(len(features)) < ev.num_accepted, ev.greedy)


def to_pairs(rounds: list[LiveRound]) -> PairSet:
    """Rounds as a live PairSet, each round its own round id, rows in draft order."""
    if not rounds:
        return PairSet.empty()
    sizes = [len(r.accepted) for r in rounds]
    n = sum(sizes)
    temps = [0.0 if r.greedy else SAMPLED_TEMPERATURE for r in rounds]
    return PairSet(np.concatenate([r.features for r in rounds]),
                   np.concatenate([r.accepted for r in rounds]),
                   np.repeat(np.arange(len(rounds), dtype=np.int64), sizes),
                   np.full(n, _LIVE, np.int8), np.repeat(np.asarray(temps, np.float32), sizes))


class LiveRows:
    """The newest live rounds, at most `max_rows` rows (the oldest whole rounds go first)."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._rounds: deque[LiveRound] = deque()
        self.rows = 0  # rows kept now
        self.seen = 0  # rows ever added
        self.new_rows = 0  # rows added since `mark_retrain`

    def add(self, live: LiveRound) -> None:
        self._rounds.append(live)
        k = len(live.accepted)
        self.rows += k
        self.seen += k
        self.new_rows += k
        while self.rows > self.max_rows and len(self._rounds) > 1:
            self.rows -= len(self._rounds.popleft().accepted)

    def mark_retrain(self) -> None:
        self.new_rows = 0

    def pairs(self) -> PairSet:
        return to_pairs(list(self._rounds))


class LiveStats:
    """The model in use, judged on live rounds: since it was installed and over the last
    `window_rows` rows; its drift baseline (see the module's docstring)."""

    def __init__(self, window_rows: int):
        self.window_rows = window_rows
        self.model: OnnxPredictor | None = None
        self.reset(None)

    def reset(self, model: OnnxPredictor | None) -> None:
        self.model = model
        self.total = Confusion()
        self.window = Confusion()
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (predicted, accepted)
        self.baseline_false_alarm: float | None = None

    def observe(self, live: LiveRound, model: OnnxPredictor | None) -> None:
        """Score `live` with `model` (the one in use now); a new model starts new statistics."""
        if model is not self.model:
            self.reset(model)
        if model is None:
            return
        predicted = model.predict(live.features, timed=False) >= model.threshold  # [k]
        self.total.add(predicted, live.accepted)
        self.window.add(predicted, live.accepted)
        self._recent.append((predicted, live.accepted))
        while self.window.rows - len(self._recent[0][0]) >= self.window_rows:
            self.window.add(*self._recent.popleft(), sign=-1)
        if self.baseline_false_alarm is None and self.window_full:
            self.baseline_false_alarm = self.window.rates()["false_alarm"]

    @property
    def window_full(self) -> bool:
        return self.window.rows >= self.window_rows

    def drift(self) -> float | None:
        """Window false-alarm rate less the baseline, once both exist."""
        if self.baseline_false_alarm is None or not self.window_full:
            return None
        return self.window.rates()["false_alarm"] - self.baseline_false_alarm

    def summary(self) -> dict:
        return {"model": self.model.version if self.model else None,
                "rows": self.total.rows, "cumulative": self.total.rates(),
                "window": {"rows": self.window.rows, "full": self.window_full,
                           **(self.window.rates() or {})},
                "baseline_false_alarm": self.baseline_false_alarm, "drift": self.drift()}


@dataclass(slots=True, frozen=True)
class RetrainTriggers:
    every_rows: int  # 0: off
    interval_s: float  # 0: off
    min_rows: int
    window_rows: int
    drift_false_alarm: float  # 0: off

    def due(self, *, total_rows: int, new_rows: int, since_last_s: float,
            drift: float | None) -> str | None:
        """Why a retrain is due now ("rows", "interval", "drift"), or None."""
        if total_rows < self.min_rows or new_rows == 0:
            return None
        if self.every_rows and new_rows >= self.every_rows:
            return "rows"
        if self.interval_s and since_last_s >= self.interval_s and new_rows >= self.min_rows:
            return "interval"
        if (self.drift_false_alarm and drift is not None and drift > self.drift_false_alarm
                and new_rows >= self.window_rows):
            return "drift"
        return None


def accepts(candidate_cost_ms: float, current_cost_ms: float) -> bool:
    """The accept rule: not worse than the model in use (a tie goes to the candidate)."""
    return candidate_cost_ms <= current_cost_ms + 1e-9


@dataclass(slots=True)
class RetrainResult:
    accepted: bool
    why: str
    model: RejectionModel | None  # the candidate (None when fitting failed)
    threshold: float  # the candidate's, as it would ship: in (0, 1]
    candidate_cost_ms: float | None  # per committed token on the held-out live rounds
    current_cost_ms: float | None
    train_rows: int
    holdout_rows: int
    candidate_classification: dict[str, float] | None = None


def retrain(live: PairSet, base: PairSet | None, current: OnnxPredictor | None,
            cost: CostModel, settings: TrainSettings, holdout_frac: float,
            seed: int) -> RetrainResult:
    """Fit a candidate and judge it against `current` (module docstring); CPU-bound, run it in
    a worker thread."""
    train_live, held = live.split_rounds(holdout_frac, seed)
    train = PairSet.concat([train_live, base]) if base is not None and len(base) else train_live
    if not len(held) or not len(train_live):
        return RetrainResult(False, f"too few live rounds to hold out {holdout_frac:.0%} of "
                             f"them ({len(live)} rows)", None, 1.0, None, None, len(train),
                             len(held))
    try:
        cand = fit_candidate("mlp", train, cost, settings, seed=seed)
    except ValueError as exc:  # too few rounds for the fit's own validation split
        return RetrainResult(False, str(exc), None, 1.0, None, None, len(train), len(held))
    # A chosen "never stop" cannot ship (a threshold is in (0, 1]); 1.0 stops only at
    # certainty, the nearest rule a model can carry, and it is judged as it would ship.
    threshold = min(cand.threshold, 1.0)
    cand_scores = score("mlp", cand.model, held)
    cand_cost = replay(held, cand_scores, threshold, cost).per_committed(cost)["cost_ms"]
    if current is not None:
        cur_scores = current.predict(held.features, timed=False)
        cur_threshold = current.threshold
    else:
        cur_scores, cur_threshold = np.zeros(len(held), np.float32), NEVER  # fixed k_max
    cur_cost = replay(held, cur_scores, cur_threshold, cost).per_committed(cost)["cost_ms"]
    ok = accepts(cand_cost, cur_cost)
    why = (f"{cand_cost:.3f} ms per committed token on {len(held)} held-out live rows vs "
           f"{cur_cost:.3f} for {current.version if current else 'fixed k_max (no model)'}: "
           + ("not worse" if ok else "worse"))
    return RetrainResult(ok, why, cand.model, threshold, cand_cost, cur_cost, len(train),
                         len(held), classification(held.accepted, cand_scores, threshold))


@dataclass(slots=True)
class Decision:
    """One retrain, as /status shows it."""

    n: int
    reason: str  # what triggered it
    outcome: str  # accepted | rejected | failed
    why: str
    current_version: str | None
    new_version: str | None = None  # the accepted candidate's model version
    published: int | None = None  # its sequence number in the object store
    threshold: float | None = None
    candidate_cost_ms: float | None = None
    current_cost_ms: float | None = None
    train_rows: int = 0
    holdout_rows: int = 0
    seconds: float = 0.0
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}
