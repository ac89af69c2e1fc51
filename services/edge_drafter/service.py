"""edge-drafter: hosts many sessions (one per device in a real deployment; many emulated
devices in tests and loadgen), drafts with the draft model, and streams tokens to clients.

Transport and wiring only: the round loop is `common.engine.session.SessionCore`, served over
NATS by `common.transport.generation.GenerationServer`; drafting is the drafter core behind a
`DraftBatcher`; draft-length policies come from a `PolicyCatalog`. Mode wisp's rejection
predictor sits in a `PredictorSlot`: the ONNX file of `--predictor` at start, then the newest
model the predictor service stored and each one it announces (`PredictorFollower`); a model
that cannot serve is refused with a warning and the last good one (or fixed k) stays.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import structlog
from aiohttp import web

from common import protocol as wire
from common.config import BaseConfig
from common.engine.draft_batcher import DraftBatcher
from common.engine.drafter import DrafterCore
from common.engine.policies import PolicyCatalog
from common.engine.predictor.runtime import PredictorSlot
from common.errors import WispError
from common.limits import max_prompt_bytes
from common.models.loading import DEFAULT_DRAFT, DEFAULT_PREDICTOR, LoadedModel, load_model
from common.models.runner_factory import make_runner
from common.protocol import ModelLimits
from common.store import SessionStore
from common.subjects import EDGE_QUEUE, GENERATE_EDGE, SERVER_GENERATE, to_name
from common.transport.generation import GenerationServer
from common.transport.predictor_store import PredictorFollower
from common.transport.service import Service, publish_refusal
from services.edge_drafter.device_profile import emulate, get_profile, load_profiles

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class EdgeConfig(BaseConfig):
    draft_model: str = DEFAULT_DRAFT
    device: str = "auto"
    dtype: str = ""
    k_max: int = 8  # most tokens this drafter drafts per round (requests may ask for fewer)
    kv_budget_mb: int = 128
    device_id: str = ""  # default: this host's name
    device_profile: str = ""  # emulate a device (services/edge_drafter/profiles.toml)
    # A TOML file of [profiles.NAME] tables (e.g. a loadgen fleets file) that requests and
    # device_profile may name besides the presets; "": the presets only.
    device_profiles: str = ""
    verify_timeout_s: float = 10.0
    verify_retries: int = 3
    predictor: str = DEFAULT_PREDICTOR  # rejection predictor (ONNX) for mode wisp; "": none
    follow_predictor: bool = True  # install the predictor service's newer models as they come
    # Share of wisp rounds drafted to k_max without the predictor: uncensored live labels for
    # the predictor service to learn from (the cost: that share of rounds at fixed k).
    predictor_explore: float = 0.05

    def __post_init__(self) -> None:
        if not 1 <= self.k_max <= wire.MAX_DRAFT_TOKENS:
            raise ValueError(f"k_max must be in [1, {wire.MAX_DRAFT_TOKENS}], got {self.k_max}")
        # A bad profiles file or an unknown profile fails at start, not at the first request.
        get_profile(self.device_profile, load_profiles(self.device_profiles))
        if not 0.0 <= self.predictor_explore <= 1.0:
            raise ValueError(f"predictor_explore must be in [0, 1], got {self.predictor_explore}")


class EdgeDrafterService(Service):
    name = "edge-drafter"

    def __init__(self, config: EdgeConfig, model: LoadedModel | None = None):
        super().__init__()
        self.config = config
        self.model = model
        self.server: GenerationServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self._sub = None
        self.predictor = PredictorSlot()
        self.follower: PredictorFollower | None = None

    async def start(self) -> None:
        cfg = self.config
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, cfg.draft_model, cfg.device,
                                                 cfg.dtype or None)
        model = self.model
        runner = make_runner(model.model, kv_budget_bytes=cfg.kv_budget_mb << 20)
        profiles = load_profiles(cfg.device_profiles)
        if cfg.predictor:  # a missing or refused file is the slot's warning: wisp drafts k_max
            await asyncio.to_thread(self.predictor.install_file, cfg.predictor)
        if cfg.follow_predictor:
            self.follower = PredictorFollower(self.nc, self.predictor)
            await self.follower.start()
        policies = PolicyCatalog.standard(("sled", "wisp", "ucb"), predictor=self.predictor,
                                          explore=cfg.predictor_explore)
        limits = ModelLimits(vocab=model.vocab_info, k_max=cfg.k_max,
                             max_context=model.max_positions,
                             max_prompt_tokens=model.max_positions // 2)
        self.server = GenerationServer(
            nc=self.nc, store=SessionStore(self.redis), tokenizer=model.tokenizer,
            eos_token_id=model.eos_token_id, limits=limits, modes=policies.modes,
            device_id=cfg.device_id or to_name(socket.gethostname()),
            drafter=DraftBatcher(DrafterCore(runner, model.eos_token_id, k_max=cfg.k_max)),
            policies=policies, default_k_max=cfg.k_max, verify_timeout_s=cfg.verify_timeout_s,
            verify_retries=cfg.verify_retries,
            max_prompt_bytes=max_prompt_bytes(limits.max_prompt_tokens,
                                              model.longest_token_bytes),
            emulation=emulate(get_profile(cfg.device_profile, profiles), profiles),
            elsewhere={m: SERVER_GENERATE for m in wire.SERVER_MODES})
        self._sub = await self.nc.subscribe(GENERATE_EDGE, queue=EDGE_QUEUE, cb=self._on_generate)

    def ready(self) -> bool:
        return self.server is not None

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/predictor", self._predictor)]

    async def _predictor(self, _: web.Request) -> web.Response:
        """The rejection predictor in use here and its measured per-call latency (µs)."""
        model = self.predictor.current
        if model is None:
            return web.json_response({"version": None, "fallback": "fixed k_max"})
        return web.json_response({
            "version": model.version, "threshold": model.threshold, "source": model.source,
            "sha256": model.sha256, "explore": self.config.predictor_explore,
            "latency_us": model.latency.summary()})

    async def _on_generate(self, msg) -> None:
        if not msg.reply:
            log.warning("generate_without_reply_inbox")
            return
        try:
            request = wire.decode(wire.GenerateRequest, msg.data)
        except WispError as err:
            log.warning("bad_generate_request", reason=err.message)
            await self.nc.publish(msg.reply, wire.error_reply(err))
            await publish_refusal(self.nc, err)
            return
        task = asyncio.create_task(self.server.serve(request, msg.reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        # Take no new generations, then let running ones finish: no round is lost.
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.follower is not None:
            await self.follower.stop()
        if self.server is not None:
            self.server.drafter.shutdown()
