"""Drafter core: the draft model's side of a round, for many sessions at once.

No NATS: the edge-drafter service (through a `DraftBatcher`), the scheduler's colocated mode and
the in-process engine drive this. Sessions that draft at the same moment share each draft
forward pass, and each draft step asks each policy once for all of its sessions in the step.
`begin`/`step` batch continuously: a session joins the drafts in progress at the next step.

Draft KV invariant: between rounds the runner holds KV for at most committed[:-1]; a round first
feeds `committed[cached:]` (at least the last committed token), then each drafted token except
the last one (its KV is only needed if it is accepted, and then the next round feeds it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from common.engine.features import DRAFT_FEATURES, NUM_FEATURES, draft_features
from common.engine.policies import DraftPolicy, DraftStep, PolicySession, RoundFeedback
from common.errors import ErrorCode, WispError
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, uncached_tail
from common.protocol import SessionSpec
from common.sampling import draft_sparse, sample_sparse, session_seed

__all__ = ["Draft", "DrafterCore"]

# The draft's generator stream must differ from the verifier's even for one session seed.
_DRAFT_SEED_SALT = 0x5EED_D4AF


@dataclass(slots=True)
class Draft:
    sid: str
    base_len: int  # committed length this draft extends
    token_ids: list[int] = field(default_factory=list)  # [k]
    features: list[list[float]] = field(default_factory=list)  # [k][F]
    sparse_ids: list[list[int]] | None = None  # [k][m], sampling only
    sparse_probs: list[list[float]] | None = None  # [k][m], sampling only
    token_times_s: list[float] = field(default_factory=list)  # [k] drafting time per token
    policy: str | None = None  # spec of the policy that drafted it
    predictor_version: str | None = None  # the rejection predictor that policy used, if any
    censored: bool = False  # its length was cut by a rule reading the features

    @property
    def draft_time_s(self) -> float:
        return sum(self.token_times_s)

    def wasted_time_s(self, num_accepted: int) -> float:
        """Drafting time of the tokens the target rejected (wasted drafting time, WDT)."""
        return sum(self.token_times_s[num_accepted:])


@dataclass(slots=True)
class _Session:
    spec: SessionSpec
    committed: list[int]
    prompt_len: int
    policy: DraftPolicy
    generator: torch.Generator
    last_draft: Draft | None = None
    prev_accept_rate: float = 1.0  # accepted / drafted of its last round that drafted

    @property
    def remaining(self) -> int:
        return self.spec.max_new_tokens - (len(self.committed) - self.prompt_len)


class DrafterCore:
    def __init__(self, runner: ModelRunner, eos_token_id: int | None, k_max: int = 16):
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.k_max = k_max
        self.sessions: dict[str, _Session] = {}
        self._drafting: dict[str, tuple[Draft, int]] = {}  # sid -> (draft so far, its limit)

    def open(self, spec: SessionSpec, prompt_ids: list[int], policy: DraftPolicy,
             committed_output: list[int] | None = None) -> None:
        """Host a session; its prompt and committed output were checked against this model's
        limits by the caller (common.limits)."""
        tokens = list(prompt_ids) + list(committed_output or [])
        seed = session_seed(spec.seed, len(tokens), len(prompt_ids))
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        generator = torch.Generator().manual_seed(seed ^ _DRAFT_SEED_SALT)
        self.close(spec.sid)
        self.sessions[spec.sid] = _Session(spec, tokens, len(prompt_ids), policy, generator)
        policy.open(PolicySession(spec.sid, spec.device_id, spec.k_max))

    def close(self, sid: str) -> None:
        self._drafting.pop(sid, None)
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.policy.close(sid)
        self.runner.free(sid)

    def committed(self, sid: str) -> list[int]:
        return list(self._session(sid).committed)

    def draft(self, sids: list[str]) -> dict[str, Draft]:
        """Draft the next round for every session in `sids`, batching each step across them."""
        if self._drafting:
            raise RuntimeError("draft() while step-wise drafts are in progress")
        done = self.begin(sids)
        while self._drafting:
            done.update(self.step())
        return done

    def begin(self, sids: list[str]) -> dict[str, Draft]:
        """Start drafting for `sids`; the next `step` calls extend them together with the drafts
        already in progress (continuous batching: a session that becomes ready while others
        draft joins at the next step instead of waiting for their whole round). Returns the
        drafts that are already finished (nothing to draft: the output budget is spent)."""
        for sid in sids:  # all checked before anything changes: a failed begin starts none
            self._session(sid)
            if sid in self._drafting:
                raise RuntimeError(f"session {sid} is already drafting")
        limits = self._round_limits(sids)
        done: dict[str, Draft] = {}
        for sid in sids:
            draft = Draft(sid, len(self.sessions[sid].committed))
            if limits[sid] > 0:
                self._drafting[sid] = (draft, limits[sid])
            else:
                done[sid] = self._finish(draft)
        return done

    def step(self) -> dict[str, Draft]:
        """One draft forward over every draft in progress; returns those it finished."""
        pending = list(self._drafting)
        if not pending:
            return {}
        drafts = {sid: self._drafting[sid][0] for sid in pending}
        start = time.perf_counter()
        try:
            logits = self._forward(pending, drafts)  # [B, V]
        except Exception:
            self._drafting.clear()  # every draft in this step failed with it
            raise
        positions = torch.tensor([len(drafts[sid].token_ids) for sid in pending],
                                 dtype=torch.int64)  # [B]
        cum_before = torch.tensor([_cum_confidence(drafts[sid]) for sid in pending])  # [B]
        prev_accept = torch.tensor([self.sessions[sid].prev_accept_rate
                                    for sid in pending])  # [B]
        features = draft_features(logits, positions, cum_before, prev_accept)  # [B, F]
        tokens, sparse = self._choose(pending, logits)
        last = self._last(pending, positions, features)  # [B] bool
        elapsed = time.perf_counter() - start
        rows = features.tolist()
        done: dict[str, Draft] = {}
        for row, sid in enumerate(pending):
            draft, token = drafts[sid], tokens[row]
            draft.token_ids.append(token)
            draft.features.append(rows[row])
            draft.token_times_s.append(elapsed)
            if sparse[row] is not None:  # sampling sessions only: greedy ones send none
                draft.sparse_ids = (draft.sparse_ids or []) + [sparse[row][0]]
                draft.sparse_probs = (draft.sparse_probs or []) + [sparse[row][1]]
            if (last[row] or len(draft.token_ids) >= self._drafting[sid][1]
                    or token == self.eos_token_id):
                del self._drafting[sid]
                done[sid] = self._finish(draft)
        return done

    @property
    def drafting(self) -> int:
        """Sessions with a draft in progress (between `begin` and the step that ends it)."""
        return len(self._drafting)

    def _finish(self, draft: Draft) -> Draft:
        session = self.sessions[draft.sid]
        session.last_draft = draft
        draft.policy = session.policy.spec
        draft.predictor_version = session.policy.version_for(draft.sid)
        draft.censored = session.policy.censors(draft.sid)
        return draft

    def apply(self, sid: str, num_accepted: int, new_tokens: list[int],
              round_trip_s: float | None = None) -> None:
        """Take the verifier's verdict: `new_tokens` = accepted drafts + the target's token.
        BASE_MISMATCH when it is not a verdict on this session's outstanding draft (another
        edge drove the round): then `resync` to the committed tokens."""
        session = self._session(sid)
        draft = session.last_draft
        base = len(session.committed)
        if (draft is None or draft.base_len != base
                or not 0 <= num_accepted <= len(draft.token_ids)
                or new_tokens[:num_accepted] != draft.token_ids[:num_accepted]):
            raise WispError(ErrorCode.BASE_MISMATCH,
                            f"the verdict for session {sid} is not on its outstanding draft")
        session.committed.extend(new_tokens)
        # KV holds committed[:base] + draft[:-1]; keep what was accepted, never the last
        # committed token (new_tokens may have been cut short at EOS or max_new_tokens).
        self._keep_kv(sid, min(base + num_accepted, len(session.committed) - 1))
        session.last_draft = None
        if draft.token_ids:
            session.prev_accept_rate = num_accepted / len(draft.token_ids)
        session.policy.observe(RoundFeedback(
            sid=sid, num_drafted=len(draft.token_ids), num_accepted=num_accepted,
            features=torch.tensor(draft.features, dtype=torch.float32).reshape(
                len(draft.token_ids), NUM_FEATURES),
            draft_time_s=draft.draft_time_s, round_trip_s=round_trip_s))

    def resync(self, sid: str, committed: list[int]) -> None:
        """Adopt committed tokens decided elsewhere (another edge drove this session's round):
        keep the KV of the common prefix, drop the outstanding draft."""
        session = self._session(sid)
        common = 0
        for mine, theirs in zip(session.committed, committed, strict=False):
            if mine != theirs:
                break
            common += 1
        session.committed = list(committed)
        session.last_draft = None
        self._keep_kv(sid, min(common, len(committed) - 1))

    # -- internals --------------------------------------------------------------------------
    def _session(self, sid: str) -> _Session:
        session = self.sessions.get(sid)
        if session is None:
            raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
        return session

    def _keep_kv(self, sid: str, length: int) -> None:
        self.runner.truncate(sid, min(self.runner.cached_len(sid), length))

    def _round_limits(self, sids: list[str]) -> dict[str, int]:
        """Per session: its policy's limit, capped by its k_max, this core's and the room left
        (a round commits up to k + 1 tokens; drafting past the output budget or the draft
        model's context is pure waste)."""
        limits: dict[str, int] = {}
        for policy, group in self._by_policy(sids):
            for sid, wanted in zip(group, policy.round_limits(group), strict=True):
                session = self.sessions[sid]
                room = min(session.remaining - 1,
                           self.runner.max_positions - len(session.committed))
                limits[sid] = max(0, min(wanted, session.spec.k_max, self.k_max, room))
        return limits

    def _last(self, sids: list[str], positions: torch.Tensor,
              features: torch.Tensor) -> torch.Tensor:
        """[B] bool: one `last` call per policy for its rows of this step."""
        last = torch.zeros(len(sids), dtype=torch.bool)
        index = {sid: row for row, sid in enumerate(sids)}
        for policy, group in self._by_policy(sids):
            rows = torch.tensor([index[sid] for sid in group], dtype=torch.int64)
            last[rows] = policy.last(DraftStep(group, positions[rows], features[rows]))
        return last

    def _by_policy(self, sids: list[str]) -> list[tuple[DraftPolicy, list[str]]]:
        groups: dict[int, tuple[DraftPolicy, list[str]]] = {}
        for sid in sids:
            policy = self.sessions[sid].policy
            groups.setdefault(id(policy), (policy, []))[1].append(sid)
        return list(groups.values())

    def _forward(self, sids: list[str], drafts: dict[str, Draft]) -> torch.Tensor:
        """One draft step for `sids`: logits [B, V] for each sequence's next token.

        Each item feeds whatever part of committed + drafted-so-far the runner does not hold,
        computed right before the forward because a previous sub-batch may have evicted it.
        """
        try:
            items = [self._step_item(sid, drafts[sid]) for sid in sids]
            return torch.cat(self.runner.forward(items), dim=0)
        except KVCacheFull:
            if len(sids) == 1:
                raise WispError(ErrorCode.CAPACITY,
                                f"draft KV cannot hold session {sids[0]}") from None
            half = len(sids) // 2
            return torch.cat([self._forward(sids[:half], drafts),
                              self._forward(sids[half:], drafts)], dim=0)

    def _step_item(self, sid: str, draft: Draft) -> ForwardItem:
        tail, _ = uncached_tail(self.runner, sid, self.sessions[sid].committed + draft.token_ids)
        return ForwardItem(sid, tail, num_logits=1)

    def _choose(self, sids: list[str], logits: torch.Tensor):
        """Pick each session's next draft token from logits [B, V]: (tokens [B], sparse [B])
        where sparse[row] is (ids [m], probs [m]) of a sampling session's top-m distribution,
        None for a greedy one (it proposes its argmax)."""
        tokens = logits.argmax(dim=-1).tolist()
        sparse: list[tuple[list[int], list[float]] | None] = [None] * len(sids)
        for row, sid in enumerate(sids):
            session = self.sessions[sid]
            if session.spec.sampling.greedy:
                continue
            ids, probs = draft_sparse(logits[row : row + 1], session.spec.sampling)  # [1, m]
            tokens[row] = int(sample_sparse(ids, probs, session.generator)[0])
            sparse[row] = (ids[0].tolist(), probs[0].tolist())
        return tokens, sparse


_CUM_CONFIDENCE = DRAFT_FEATURES.index("cum_confidence")


def _cum_confidence(draft: Draft) -> float:
    """Product of the confidences of the tokens drafted so far this round (1 before any)."""
    return draft.features[-1][_CUM_CONFIDENCE] if draft.features else 1.0
