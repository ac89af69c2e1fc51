"""edge-drafter: hosts many sessions (one per device in a real deployment; many emulated
devices in tests and loadgen), drafts with the draft model, and streams tokens to clients.

Transport and orchestration only: the round loop is common/generation.py, the drafting is
services/edge_drafter/core.py behind a DraftBatcher.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import structlog

from common import protocol as wire
from common.config import BaseConfig
from common.device_profile import get_profile
from common.draft_batcher import DraftBatcher
from common.errors import WispError
from common.generation import EDGE_MODES, GenerationContext, run_generation
from common.models.loading import DEFAULT_DRAFT, LoadedModel, load_model
from common.models.runner_factory import make_runner
from common.service import Service
from common.store import SessionStore
from common.subjects import EDGE_QUEUE, GENERATE_EDGE, to_name
from services.edge_drafter.core import DrafterCore

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class EdgeConfig(BaseConfig):
    draft_model: str = DEFAULT_DRAFT
    device: str = "auto"
    dtype: str = ""
    k_max: int = 8  # most tokens this drafter drafts per round (requests may ask for fewer)
    kv_budget_mb: int = 128
    device_id: str = ""  # default: this host's name
    device_profile: str = ""  # emulate a device (common/device_profile.py); '' = none
    verify_timeout_s: float = 10.0
    verify_retries: int = 3


class EdgeDrafterService(Service):
    name = "edge-drafter"

    def __init__(self, config: EdgeConfig, model: LoadedModel | None = None):
        super().__init__()
        self.config = config
        self.model = model
        self.ctx: GenerationContext | None = None
        self.tasks: set[asyncio.Task] = set()
        self._sub = None

    async def start(self) -> None:
        cfg = self.config
        profile = get_profile(cfg.device_profile)  # fail at start on a bad name
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, cfg.draft_model, cfg.device,
                                                 cfg.dtype or None)
        runner = make_runner(self.model.model, kv_budget_bytes=cfg.kv_budget_mb << 20)
        core = DrafterCore(runner, self.model.eos_token_id, k_max=cfg.k_max)
        self.ctx = GenerationContext(
            nc=self.nc, store=SessionStore(self.redis), tokenizer=self.model.tokenizer,
            drafter=DraftBatcher(core), device_id=cfg.device_id or to_name(socket.gethostname()),
            eos_token_id=self.model.eos_token_id, default_k_max=cfg.k_max,
            verify_timeout_s=cfg.verify_timeout_s, verify_retries=cfg.verify_retries,
            profile=profile, modes=EDGE_MODES, vocab_size=self.model.vocab_size,
            max_prompt_tokens=self.model.max_positions // 2)
        self._sub = await self.nc.subscribe(GENERATE_EDGE, queue=EDGE_QUEUE, cb=self._on_generate)

    def ready(self) -> bool:
        return self.ctx is not None

    async def _on_generate(self, msg) -> None:
        if not msg.reply:
            log.warning("generate_without_reply_inbox")
            return
        try:
            request = wire.decode(wire.GenerateRequest, msg.data)
        except WispError as err:
            log.warning("bad_generate_request", reason=err.message)
            await self.nc.publish(msg.reply, wire.error_reply(err))
            return
        task = asyncio.create_task(run_generation(self.ctx, request, msg.reply))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        # Take no new generations, then let running ones finish: no round is lost.
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.ctx is not None:
            self.ctx.drafter.close()
