"""Draft and verify in one process: `wisp generate --local`, benchmarks and tests.

Sessions run the same round loop as every other driver (`SessionCore.round`), with ports that
call the two cores directly in lockstep: each engine step, every active session drafts (one
batched draft forward per draft position across them) and then all of them are verified in one
target forward pass. Sessions may join late (`start_step`), so a verify batch mixes cold
prefills with warm verifies of other lengths.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from common.engine.drafter import Draft, DrafterCore
from common.engine.policies import DraftPolicy, FixedK
from common.engine.session import EdgeSession, SessionCore
from common.engine.verifier import VerifierCore
from common.errors import WispError
from common.limits import check_open
from common.models.vocab import vocab_info
from common.protocol import (
    ModelLimits,
    RoundEvent,
    SamplingParams,
    SessionSpec,
    VerifyRequest,
    VerifyResult,
)

__all__ = ["GenerationRequest", "GenerationResult", "InProcessEngine", "LocalStack",
           "build_local_stack"]


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    policy: DraftPolicy | None = None  # None: FixedK() (k_max tokens a round)
    start_step: int = 0  # join the batch at this engine step (staggered arrivals)


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    rounds: list[RoundEvent]
    wall_s: float
    finished: bool

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def num_drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def num_accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return len(self.token_ids) / self.num_rounds if self.num_rounds else 0.0

    def stats(self) -> dict:
        return {
            "num_tokens": len(self.token_ids), "rounds": self.num_rounds,
            "drafted": self.num_drafted, "accepted": self.num_accepted,
            "wasted": self.num_drafted - self.num_accepted,
            "wasted_draft_ms": round(sum(r.wasted_draft_ms for r in self.rounds), 3),
            "draft_ms": round(sum(r.draft_ms for r in self.rounds), 3),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_round": round(self.tokens_per_round, 3),
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(len(self.token_ids) / self.wall_s, 2) if self.wall_s else None,
        }


class _Lockstep:
    """Collects one call from each of `expected` sessions, then runs them as one batch."""

    def __init__(self, run: Callable[[list[Any]], list[Any]]):
        self._run = run
        self.expected = 0
        self._calls: list[tuple[Any, asyncio.Future]] = []

    async def call(self, arg: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._calls.append((arg, future))
        if len(self._calls) == self.expected:
            calls, self._calls = self._calls, []
            try:
                results = self._run([a for a, _ in calls])
            except Exception as exc:  # noqa: BLE001 - every session of the step hears it
                for _, f in calls:
                    f.set_exception(exc)
            else:
                for (_, f), result in zip(calls, results, strict=True):
                    f.set_result(result)
        return await future


class _LocalDrafter:
    """DraftPort over a DrafterCore in this thread: one `draft` call per step."""

    def __init__(self, core: DrafterCore):
        self.core = core
        self.step = _Lockstep(self._draft)

    def _draft(self, sids: list[str]) -> list[Draft]:
        drafts = self.core.draft(sids)
        return [drafts[sid] for sid in sids]

    async def draft(self, sid: str) -> Draft:
        return await self.step.call(sid)

    async def apply(self, sid: str, num_accepted: int, new_tokens: list[int],
                    round_trip_s: float | None) -> None:
        self.core.apply(sid, num_accepted, new_tokens, round_trip_s)

    async def resync(self, sid: str, committed: list[int]) -> None:
        self.core.resync(sid, committed)


class _LocalVerifier:
    """VerifyPort over a VerifierCore in this thread: one `verify_batch` per step."""

    uplink_ms = 0.0

    def __init__(self, core: VerifierCore):
        self.core = core
        self.step = _Lockstep(self._verify)

    def _verify(self, requests: list[VerifyRequest]) -> list[VerifyResult | WispError]:
        out: list[VerifyResult | WispError] = []
        for v in self.core.verify_batch(requests):
            out.append(v if isinstance(v, WispError)
                       else msgspec.structs.replace(v.result, batch_size=len(requests)))
        return out

    async def submit(self, request: VerifyRequest) -> VerifyResult:
        result = await self.step.call(request)
        if isinstance(result, WispError):
            raise result
        return result


class InProcessEngine:
    """`drafter=None` runs target-only autoregressive decoding (k = 0 every round)."""

    def __init__(self, verifier: VerifierCore, drafter: DrafterCore | None = None,
                 k_max: int = 8):
        self.verifier = verifier
        self.drafter = drafter
        self.k_max = k_max
        runner = verifier.runner
        # Both cores run here, on a pair whose vocabularies were compared when it was loaded.
        vocab = vocab_info(runner.vocab_size, eos_token_id=verifier.eos_token_id)
        self.limits = ModelLimits(vocab=vocab, k_max=k_max, max_context=runner.max_positions,
                                  max_prompt_tokens=runner.max_positions // 2)
        self._default_policy = FixedK()
        self._ids = itertools.count()

    @classmethod
    def from_models(cls, draft, target, k_max: int, **runner_kw) -> InProcessEngine:
        """Both cores over loaded models (`common.models.loading.LoadedModel`); `draft=None`
        gives target-only decoding. `runner_kw` goes to `make_runner` (KV budget, blocks)."""
        from common.models.runner_factory import make_runner

        eos = target.eos_token_id
        verifier = VerifierCore(make_runner(target.model, **runner_kw), eos)
        drafter = None
        if draft is not None:
            drafter = DrafterCore(make_runner(draft.model, **runner_kw), eos, k_max=k_max)
        return cls(verifier, drafter, k_max)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_many([request])[0]

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._generate_many(requests))
        raise RuntimeError("InProcessEngine.generate_many runs its own event loop; call it "
                           "from synchronous code (or a worker thread)")

    async def _generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        drafter = _LocalDrafter(self.drafter) if self.drafter else None
        verifier = _LocalVerifier(self.verifier)
        core = SessionCore(verifier, drafter, self.verifier.eos_token_id, time.perf_counter)
        sids = [f"local-{next(self._ids)}" for _ in requests]
        results = {sid: GenerationResult([], [], 0.0, False) for sid in sids}
        active: dict[str, EdgeSession] = {}
        last_start = max((r.start_step for r in requests), default=0)
        step = 0
        try:
            while active or step <= last_start:
                for sid, req in zip(sids, requests, strict=True):
                    if req.start_step == step:
                        active[sid] = self._open(core, sid, req)
                if active:
                    if drafter is not None:
                        drafter.step.expected = len(active)
                    verifier.step.expected = len(active)
                    sessions = list(active.values())
                    events = await asyncio.gather(*(core.round(s) for s in sessions))
                    for s, event in zip(sessions, events, strict=True):
                        result = results[s.sid]
                        result.rounds.append(event)
                        if s.finished:
                            result.token_ids = s.output
                            result.finished = True
                            result.wall_s = time.perf_counter() - s.started_s
                            del active[s.sid]
                            self._close(s.sid)
                step += 1
        finally:
            for sid in active:
                self._close(sid)
        return [results[sid] for sid in sids]

    def _open(self, core: SessionCore, sid: str, req: GenerationRequest) -> EdgeSession:
        spec = SessionSpec(sid=sid, mode="colocated" if self.drafter else "centralized",
                           max_new_tokens=req.max_new_tokens, sampling=req.params,
                           seed=req.seed, k_max=self.k_max, device_id="local")
        check_open(spec, req.prompt_ids, self.limits.vocab, self.limits, "the target")
        self.verifier.open_session(spec, req.prompt_ids)
        if self.drafter:
            self.drafter.open(spec, req.prompt_ids, req.policy or self._default_policy)
        return core.session(spec, req.prompt_ids)

    def _close(self, sid: str) -> None:
        self.verifier.close_session(sid)
        if self.drafter:
            self.drafter.close(sid)


@dataclass(slots=True)
class LocalStack:
    engine: InProcessEngine
    tokenizer: object


def build_local_stack(draft: str | None = None, target: str | None = None,
                      device: str = "auto", dtype: str | None = None, k_max: int = 8,
                      target_only: bool = False, kv_budget_bytes: int | None = None,
                      allow_download: bool = False) -> LocalStack:
    """Load the pair (the shipped tiny pair by default) and wire both cores in one process."""
    from common.models.loading import DEFAULT_DRAFT, DEFAULT_TARGET, load_model, load_pair

    if target_only:
        target_model = load_model(target or DEFAULT_TARGET, device, dtype, allow_download)
        draft_model = None
    else:
        draft_model, target_model = load_pair(draft or DEFAULT_DRAFT, target or DEFAULT_TARGET,
                                              device, dtype, allow_download)
    engine = InProcessEngine.from_models(draft_model, target_model, k_max,
                                         kv_budget_bytes=kv_budget_bytes)
    return LocalStack(engine, target_model.tokenizer)
