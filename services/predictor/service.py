"""The predictor service: learns the rejection predictor from live traffic and ships it.

It reads every event (``wisp.events.>``, queue group `PREDICTOR_QUEUE`): each `VerdictEvent`
with features is a live round (its rows, labelled by the verdict), scored with the model in
use for live precision / recall / false alarm; each `RoundEvent` counts a round under the
predictor version the edge's policy used. A payload that does not decode is counted, logged
(rate-limited) and dropped; nothing stops the subscription.

A retrain (when `RetrainTriggers` says so; `live.py` has the rules) runs in a worker thread:
fit an MLP candidate, judge it against the current model on held-out live rounds, and when it
is not worse, export it (``live-{n}``), check that it loads, store and announce it
(`publish_model`) and install it here. Edges follow the announcements (`PredictorFollower`);
this service follows them too, so it starts from the newest stored model, and scores with
what the edges were told to use.

Routes (besides /healthz and /readyz): ``GET /metrics`` (Prometheus text) and ``GET /status``
(JSON: the model, live statistics, rows, rounds by edge predictor version, retrain history).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

import structlog
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.config import BaseConfig
from common.engine.predictor.cost import CostModel
from common.engine.predictor.model import TrainSettings, export_onnx
from common.engine.predictor.pairs import PairSet
from common.engine.predictor.runtime import OnnxPredictor, PredictorError, PredictorSlot
from common.errors import WispError
from common.models.loading import DEFAULT_PREDICTOR
from common.protocol import AnyEvent, RoundEvent, VerdictEvent, decode
from common.subjects import EVENTS_ALL, PREDICTOR_BUCKET, PREDICTOR_QUEUE
from common.transport.predictor_store import PredictorFollower, newest_version, publish_model
from common.transport.service import Service
from services.predictor.live import (
    Decision,
    LiveRows,
    LiveStats,
    RetrainResult,
    RetrainTriggers,
    retrain,
    verdict_round,
)

__all__ = ["PredictorConfig", "PredictorService"]

log = structlog.get_logger(__name__)

CHECK_S = 0.5  # how often the retrain triggers are looked at
MAX_EDGE_VERSIONS = 64  # distinct edge predictor versions kept as labels; the rest: "other"
_LOG_FIRST_BAD = 10  # then one line per _LOG_EVERY_BAD bad events
_LOG_EVERY_BAD = 1000


@dataclass(slots=True)
class PredictorConfig(BaseConfig):
    """The predictor service (python -m services.predictor)."""

    predictor: str = DEFAULT_PREDICTOR  # ONNX model to start from ("": none, i.e. fixed k)
    base_pairs: str = ""  # offline pairs (.npz) added to every retrain's training rows
    retrain_every_rows: int = 20000  # retrain after this many new live rows (0: off)
    retrain_interval_s: float = 900.0  # ... or this long after the last one (0: off)
    min_rows: int = 2000  # live rows needed for any retrain (and new ones for the interval)
    window_rows: int = 2000  # recent rows for the windowed statistics and drift
    drift_false_alarm: float = 0.1  # retrain when the window's false alarm exceeds the
    #                                 baseline by more than this (0: off)
    holdout_frac: float = 0.2  # live rounds held out to judge candidate vs current model
    max_rows: int = 200000  # newest live rows kept for retraining
    draft_step_ms: float = 25.0  # cost model: one draft step on the edge
    rtt_ms: float = 60.0  # cost model: a round trip
    verify_ms: float = 20.0  # cost model: one verify
    max_rounds_ratio: float = 1.4  # cost model: rounds cap vs fixed k_max (0: none)
    epochs: int = 100
    train_threads: int = 1  # torch threads of this process (0: torch's default)
    seed: int = 0
    history: int = 50  # retrain decisions kept for /status

    def __post_init__(self) -> None:
        for name in ("retrain_every_rows", "min_rows", "seed", "train_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("window_rows", "max_rows", "history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("retrain_interval_s", "draft_step_ms", "rtt_ms", "verify_ms",
                     "max_rounds_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.drift_false_alarm <= 1.0:
            raise ValueError(f"drift_false_alarm must be in [0, 1], got "
                             f"{self.drift_false_alarm}")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ValueError(f"holdout_frac must be in (0, 1), got {self.holdout_frac}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


class PredictorService(Service):
    name = "predictor"

    def __init__(self, config: PredictorConfig | None = None, bucket: str = PREDICTOR_BUCKET):
        super().__init__()
        cfg = self.config = config or PredictorConfig()
        self.bucket = bucket  # tests use their own
        self.slot = PredictorSlot()
        self.follower: PredictorFollower | None = None
        self.rows = LiveRows(cfg.max_rows)
        self.stats = LiveStats(cfg.window_rows)
        self.triggers = RetrainTriggers(cfg.retrain_every_rows, cfg.retrain_interval_s,
                                        cfg.min_rows, cfg.window_rows, cfg.drift_false_alarm)
        self.cost = CostModel(cfg.draft_step_ms, cfg.rtt_ms, cfg.verify_ms,
                              cfg.max_rounds_ratio)
        self.base: PairSet | None = None
        self.edge_rounds: Counter[str] = Counter()  # predictor_version -> rounds
        self.events: Counter[str] = Counter()  # kind -> events; "bad" for undecodable ones
        self.outcomes: Counter[str] = Counter()  # retrain outcome -> count
        self.history: deque[Decision] = deque(maxlen=cfg.history)
        self.retrains = 0
        self.retraining: asyncio.Task | None = None
        self._last_retrain = time.monotonic()
        self._sub: Subscription | None = None
        self._ticker: asyncio.Task | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        if cfg.predictor:  # missing or refused: a warning (the slot's), then fixed k
            await asyncio.to_thread(self.slot.install_file, cfg.predictor)
        if cfg.base_pairs:
            try:
                self.base = await asyncio.to_thread(PairSet.load, cfg.base_pairs)
                log.info("base_pairs_loaded", path=cfg.base_pairs, rows=len(self.base))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("base_pairs_refused", path=cfg.base_pairs, error=str(exc),
                            fallback="live rows only")
        self.follower = PredictorFollower(self.nc, self.slot, self.bucket)
        await self.follower.start()
        self._sub = await self.nc.subscribe(EVENTS_ALL, queue=PREDICTOR_QUEUE, cb=self._on_msg)
        self._ticker = asyncio.create_task(self._tick())
        log.info("predictor_service_started", model=self.slot.version,
                 triggers=asdict(self.triggers))

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()
        if self._ticker is not None:
            self._ticker.cancel()
        # A retrain in flight finishes (and publishes) within the caller's drain timeout.
        if self.retraining is not None:
            await asyncio.gather(self.retraining, return_exceptions=True)
        if self.follower is not None:
            await self.follower.stop()

    def ready(self) -> bool:
        return self._sub is not None

    # -- events -------------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        self.handle(msg.data)

    def handle(self, data: bytes) -> None:
        """Decode and account one event payload; never raises."""
        try:
            ev = decode(AnyEvent, data)
        except WispError as err:
            self._bad(err.message)
            return
        try:
            self.events[type(ev).__struct_config__.tag] += 1
            if isinstance(ev, VerdictEvent):
                if ev.censored:
                    self.events["censored"] += 1
                live = verdict_round(ev)
                if live is not None:
                    self.rows.add(live)
                    self.stats.observe(live, self.slot.current)
            elif isinstance(ev, RoundEvent):
                self._count_round(ev.predictor_version or "none")
        except Exception:  # a bug here must not stop the subscription
            self.events["failed"] += 1
            log.exception("event_failed")

    def _count_round(self, version: str) -> None:
        if version not in self.edge_rounds and len(self.edge_rounds) >= MAX_EDGE_VERSIONS:
            version = "other"  # labels come from peers: keep their number bounded
        self.edge_rounds[version] += 1

    def _bad(self, reason: str) -> None:
        self.events["bad"] += 1
        n = self.events["bad"]
        if n <= _LOG_FIRST_BAD or n % _LOG_EVERY_BAD == 0:
            log.warning("bad_event", reason=reason, num_bad=n)

    # -- retraining ---------------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            if self.retraining is not None:
                continue
            reason = self.triggers.due(total_rows=self.rows.rows, new_rows=self.rows.new_rows,
                                       since_last_s=time.monotonic() - self._last_retrain,
                                       drift=self.stats.drift())
            if reason is not None:
                self.retraining = asyncio.create_task(self._retrain(reason))
                self.retraining.add_done_callback(self._retrain_done)

    def _retrain_done(self, _: asyncio.Task) -> None:
        self.retraining = None

    async def _retrain(self, reason: str) -> Decision:
        """One retrain (its decision is logged and kept in `history`); never raises."""
        cfg = self.config
        self.retrains += 1
        n = self.retrains
        pairs = self.rows.pairs()  # a snapshot: events keep arriving meanwhile
        self.rows.mark_retrain()
        self._last_retrain = time.monotonic()
        current = self.slot.current
        decision = Decision(n, reason, "failed", "", current.version if current else None)
        start = time.perf_counter()
        log.info("retrain_started", n=n, reason=reason, rows=len(pairs),
                 current=decision.current_version)
        try:
            result = await asyncio.to_thread(
                retrain, pairs, self.base, current, self.cost,
                TrainSettings(epochs=cfg.epochs, seed=cfg.seed + n), cfg.holdout_frac,
                cfg.seed + n)
            decision.why = result.why
            decision.threshold = result.threshold
            decision.candidate_cost_ms = result.candidate_cost_ms
            decision.current_cost_ms = result.current_cost_ms
            decision.train_rows, decision.holdout_rows = result.train_rows, result.holdout_rows
            decision.outcome = "accepted" if result.accepted else "rejected"
            if result.accepted:
                await self._ship(result, decision)
        except Exception as exc:  # noqa: BLE001 - a failed retrain must not stop the service
            decision.outcome = "failed"
            decision.why = f"{decision.why + '; ' if decision.why else ''}{exc!r}"
            log.exception("retrain_failed", n=n)
        decision.seconds = time.perf_counter() - start
        self.outcomes[decision.outcome] += 1
        self.history.append(decision)
        log.info("retrain_decided", **decision.as_dict())
        return decision

    async def _ship(self, result: RetrainResult, decision: Decision) -> None:
        """Export, check, store, announce and install an accepted candidate; a failure on the
        way marks the decision failed (the current model stays, everywhere)."""
        try:
            seq = await newest_version(self.nc, self.bucket) + 1
        except (NatsError, TimeoutError) as exc:
            decision.outcome, decision.why = "failed", f"{decision.why}; store: {exc!r}"
            return
        version = f"live-{seq}"
        data = await asyncio.to_thread(export_onnx, result.model, {
            "version": version, "threshold": result.threshold, "cost_model": self.cost.as_dict(),
            "source": "live", "train_rows": result.train_rows,
            "holdout_cost_ms": result.candidate_cost_ms})
        try:
            await asyncio.to_thread(OnnxPredictor, data, version)  # what the edges will check
        except PredictorError as err:
            decision.outcome, decision.why = "failed", f"{decision.why}; export: {err}"
            return
        try:
            ann = await publish_model(self.nc, data, version, result.threshold,
                                      bucket=self.bucket, version=seq)
        except (NatsError, TimeoutError, ValueError) as exc:
            decision.outcome, decision.why = "failed", f"{decision.why}; publish: {exc!r}"
            return
        decision.new_version, decision.published = version, ann.version
        if not await self.follower.offer(ann, data):
            # Only a newer announcement (another writer) gets here: that one serves.
            log.warning("retrain_superseded", version=version, serving=self.slot.version)

    # -- HTTP ---------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self._metrics), web.get("/status", self._status)]

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict:
        model = self.slot.current
        return {
            "model": None if model is None else {
                "version": model.version, "threshold": model.threshold, "sha256": model.sha256,
                "source": model.source,
                "store_version": self.follower.version if self.follower else 0},
            "live": self.stats.summary(),
            "rows": {"seen": self.rows.seen, "kept": self.rows.rows,
                     "new_since_retrain": self.rows.new_rows,
                     "base": len(self.base) if self.base is not None else 0},
            "edge_rounds": dict(self.edge_rounds),
            "events": dict(self.events),
            "retrains": {"accepted": self.outcomes["accepted"],
                         "rejected": self.outcomes["rejected"],
                         "failed": self.outcomes["failed"],
                         "running": self.retraining is not None},
            "triggers": asdict(self.triggers),
            "cost_model": self.cost.as_dict(),
            "announcements": dict(self.follower.counts) if self.follower else {},
            "history": [d.as_dict() for d in self.history],
        }


class _Collector:
    """Renders the service's state at scrape time: one source of truth, no gauges to sync."""

    def __init__(self, service: PredictorService):
        self.svc = service

    def collect(self):
        svc = self.svc
        scopes = (("cumulative", svc.stats.total.rates()), ("window", svc.stats.window.rates()))
        for key, help_text in (
                ("precision", "of 'rejected' predictions by the current model, on live rounds"),
                ("recall", "of rejected tokens by the current model, on live rounds"),
                ("false_alarm", "accepted tokens the current model predicted rejected")):
            fam = GaugeMetricFamily(f"wisp_predictor_live_{key}", help_text, labels=["scope"])
            for scope, rates in scopes:
                if rates is not None:
                    fam.add_metric([scope], rates[key])
            yield fam
        scored = GaugeMetricFamily("wisp_predictor_live_scored_rows",
                                   "live rows scored by the current model", labels=["scope"])
        scored.add_metric(["cumulative"], svc.stats.total.rows)
        scored.add_metric(["window"], svc.stats.window.rows)
        yield scored
        if svc.stats.baseline_false_alarm is not None:
            yield GaugeMetricFamily("wisp_predictor_false_alarm_baseline",
                                    "false alarm on the first full window of the current model",
                                    value=svc.stats.baseline_false_alarm)
        yield CounterMetricFamily("wisp_predictor_rows", "live rows (drafted tokens) seen",
                                  value=svc.rows.seen)
        yield GaugeMetricFamily("wisp_predictor_rows_kept", "live rows kept for retraining",
                                value=svc.rows.rows)
        retrains = CounterMetricFamily("wisp_predictor_retrains", "retrains by outcome",
                                       labels=["outcome"])
        for outcome in ("accepted", "rejected", "failed"):
            retrains.add_metric([outcome], svc.outcomes[outcome])
        yield retrains
        info = GaugeMetricFamily("wisp_predictor_version_info", "the model this service serves",
                                 labels=["version"])
        model = svc.slot.current
        if model is not None:
            info.add_metric([model.version], 1)
            yield GaugeMetricFamily("wisp_predictor_threshold", "the current model's threshold",
                                    value=model.threshold)
        yield info
        rounds = CounterMetricFamily("wisp_predictor_edge_rounds",
                                     "rounds by the predictor version the edge's policy used "
                                     "('none': no model)", labels=["predictor_version"])
        for version, count in sorted(svc.edge_rounds.items()):
            rounds.add_metric([version], count)
        yield rounds
        yield CounterMetricFamily("wisp_predictor_bad_events", "event payloads that did not "
                                  "decode", value=svc.events["bad"])
