"""Draft and verify in one process: `wisp generate --local`, benchmarks, tests, and the
scheduler's `colocated` mode all drive the two cores through this loop.

Every step drafts one round for all active sessions (one batched draft forward per draft
position) and verifies all of them in one target forward pass. Sessions may join late
(`start_step`), so a verify batch mixes cold prefills with warm verifies of other lengths.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from common.errors import WispError
from common.sampling import SamplingParams
from services.edge_drafter.core import DrafterCore
from services.edge_drafter.policies import DraftPolicy, FixedK
from services.gpu_verifier.core import SessionSpec, VerifierCore, VerifyItem, VerifyOutcome


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 64
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    policy: DraftPolicy | None = None  # None: FixedK(k_max)
    start_step: int = 0  # join the batch at this engine step (staggered arrivals)


@dataclass(slots=True)
class RoundStats:
    num_drafted: int
    num_accepted: int
    num_committed: int
    draft_time_s: float
    batch_size: int  # requests in the verify batch this round was part of


@dataclass(slots=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    rounds: list[RoundStats]
    wall_s: float
    finished: bool

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def num_drafted(self) -> int:
        return sum(r.num_drafted for r in self.rounds)

    @property
    def num_accepted(self) -> int:
        return sum(r.num_accepted for r in self.rounds)

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
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_round": round(self.tokens_per_round, 3),
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(len(self.token_ids) / self.wall_s, 2) if self.wall_s else None,
        }


class InProcessEngine:
    """`drafter=None` runs target-only autoregressive decoding (k = 0 every round)."""

    def __init__(self, verifier: VerifierCore, drafter: DrafterCore | None = None):
        self.verifier = verifier
        self.drafter = drafter
        self._ids = itertools.count()

    @classmethod
    def from_models(cls, draft, target, k_max: int, **runner_kw) -> InProcessEngine:
        """Both cores over loaded models (`common.models.loading.LoadedModel`); `draft=None`
        gives target-only decoding. `runner_kw` goes to `make_runner` (KV budget, blocks)."""
        from common.models.runner_factory import make_runner

        eos = target.eos_token_id
        verifier = VerifierCore(make_runner(target.model, **runner_kw), eos, k_max=k_max)
        drafter = None
        if draft is not None:
            drafter = DrafterCore(make_runner(draft.model, **runner_kw), eos, k_max=k_max)
        return cls(verifier, drafter)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_many([request])[0]

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        sids = [f"local-{next(self._ids)}" for _ in requests]
        results = {sid: GenerationResult([], [], 0.0, False) for sid in sids}
        started: dict[str, float] = {}
        rounds = dict.fromkeys(sids, 0)
        active: list[str] = []
        step = 0
        try:
            while True:
                for sid, req in zip(sids, requests, strict=True):
                    if req.start_step == step:
                        self._open(sid, req)
                        started[sid] = time.perf_counter()
                        active.append(sid)
                if not active:
                    if step >= max(r.start_step for r in requests):
                        break
                    step += 1
                    continue
                drafts = self.drafter.draft(active) if self.drafter else {}
                items = []
                for sid in active:
                    draft = drafts.get(sid)
                    items.append(VerifyItem(
                        sid=sid, round=rounds[sid],
                        base_len=len(self.verifier.sessions[sid].committed),
                        draft_ids=draft.token_ids if draft else [],
                        draft_sparse_ids=draft.sparse_ids if draft else None,
                        draft_sparse_probs=draft.sparse_probs if draft else None))
                outcomes = self.verifier.verify_batch(items)
                for sid, outcome in zip(list(active), outcomes, strict=True):
                    if isinstance(outcome, WispError):
                        raise outcome
                    self._record(results[sid], outcome, drafts.get(sid), len(items))
                    rounds[sid] += 1
                    if self.drafter:
                        self.drafter.apply(sid, outcome.num_accepted, outcome.new_tokens)
                    if outcome.finished:
                        results[sid].finished = True
                        results[sid].wall_s = time.perf_counter() - started[sid]
                        active.remove(sid)
                        self._close(sid)
                step += 1
        finally:
            for sid in active:
                self._close(sid)
        return [results[sid] for sid in sids]

    def _open(self, sid: str, req: GenerationRequest) -> None:
        spec = SessionSpec(sid, list(req.prompt_ids), req.max_new_tokens, req.params, req.seed)
        self.verifier.open_session(spec)
        if self.drafter:
            policy = req.policy or FixedK(self.drafter.k_max)
            self.drafter.open(sid, spec.prompt_ids, req.max_new_tokens, req.params, policy,
                              req.seed)

    def _close(self, sid: str) -> None:
        self.verifier.close_session(sid)
        if self.drafter:
            self.drafter.close(sid)

    @staticmethod
    def _record(result: GenerationResult, outcome: VerifyOutcome, draft, batch_size: int):
        result.token_ids.extend(outcome.new_tokens)
        result.rounds.append(RoundStats(
            num_drafted=outcome.num_drafted, num_accepted=outcome.num_accepted,
            num_committed=len(outcome.new_tokens),
            draft_time_s=draft.draft_time_s if draft else 0.0, batch_size=batch_size))


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
