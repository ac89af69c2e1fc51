"""Drafter core: the draft model's side of a round, for many sessions at once.

No NATS: the edge-drafter service (and loadgen's emulated devices, and the in-process engine)
drive this. Sessions that draft at the same moment share each draft forward pass, so one
process can host many emulated devices.

Draft KV invariant: between rounds the runner holds KV for at most committed[:-1]; a round first
feeds `committed[cached:]` (at least the last committed token), then each drafted token except
the last one (its KV is only needed if it is accepted, and then the next round feeds it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from common.errors import ErrorCode, WispError
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, uncached_tail
from common.sampling import SamplingParams, draft_sparse, sample_sparse
from services.edge_drafter.features import TokenFeatures, token_features
from services.edge_drafter.policies import DraftPolicy, RoundFeedback


@dataclass(slots=True)
class Draft:
    sid: str
    base_len: int  # committed length this draft extends
    token_ids: list[int] = field(default_factory=list)  # [k]
    features: list[TokenFeatures] = field(default_factory=list)  # [k]
    sparse_ids: list[list[int]] | None = None  # [k][m], sampling only
    sparse_probs: list[list[float]] | None = None  # [k][m], sampling only
    token_times_s: list[float] = field(default_factory=list)  # [k] drafting time per token

    @property
    def draft_time_s(self) -> float:
        return sum(self.token_times_s)


@dataclass(slots=True)
class _Session:
    committed: list[int]
    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    policy: DraftPolicy
    generator: torch.Generator
    last_draft: Draft | None = None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - (len(self.committed) - self.prompt_len)


class DrafterCore:
    def __init__(self, runner: ModelRunner, eos_token_id: int | None, k_max: int = 16):
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.k_max = k_max
        self.sessions: dict[str, _Session] = {}

    def open(self, sid: str, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
             policy: DraftPolicy, seed: int | None = None,
             committed_output: list[int] | None = None) -> None:
        if policy.k_max > self.k_max:
            raise WispError(ErrorCode.BAD_REQUEST,
                            f"policy k_max {policy.k_max} exceeds the drafter's {self.k_max}")
        vocab = self.runner.vocab_size
        tokens = list(prompt_ids) + list(committed_output or [])
        if not prompt_ids or any(not 0 <= t < vocab for t in tokens):
            raise WispError(ErrorCode.OUT_OF_VOCABULARY if prompt_ids else ErrorCode.BAD_REQUEST,
                            "prompt must be non-empty token ids within the vocabulary")
        seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        # Distinct stream from the verifier's generator even when both get the same seed.
        generator = torch.Generator().manual_seed(seed ^ 0x5EED_D4AF)
        self.runner.free(sid)
        self.sessions[sid] = _Session(tokens, len(prompt_ids), max_new_tokens, params, policy,
                                      generator)

    def close(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        self.runner.free(sid)

    def committed(self, sid: str) -> list[int]:
        return list(self._session(sid).committed)

    def draft(self, sids: list[str]) -> dict[str, Draft]:
        """Draft the next round for every session in `sids`, batching each step across them."""
        drafts = {sid: Draft(sid, len(self._session(sid).committed)) for sid in sids}
        limits = {sid: self._round_limit(self.sessions[sid]) for sid in sids}
        pending = [sid for sid in sids if limits[sid] > 0]
        position = 0
        while pending:
            start = time.perf_counter()
            logits = self._forward(pending, drafts)  # [B, V]
            features = token_features(logits)
            tokens, sparse = self._choose(list(pending), logits)
            elapsed = time.perf_counter() - start
            next_pending: list[str] = []
            for row, sid in enumerate(pending):
                session, draft = self.sessions[sid], drafts[sid]
                if not session.policy.keep(position, features[row]):
                    continue  # dropped token; its KV was never computed
                token = tokens[row]
                draft.token_ids.append(token)
                draft.features.append(features[row])
                draft.token_times_s.append(elapsed)
                if sparse is not None:
                    draft.sparse_ids = (draft.sparse_ids or []) + [sparse[0][row]]
                    draft.sparse_probs = (draft.sparse_probs or []) + [sparse[1][row]]
                if len(draft.token_ids) < limits[sid] and token != self.eos_token_id:
                    next_pending.append(sid)
            pending = next_pending
            position += 1
        for sid, draft in drafts.items():
            self.sessions[sid].last_draft = draft
        return drafts

    def apply(self, sid: str, num_accepted: int, new_tokens: list[int],
              round_trip_s: float | None = None) -> None:
        """Take the verifier's verdict: `new_tokens` = accepted drafts + the target's token."""
        session = self._session(sid)
        draft = session.last_draft
        base = len(session.committed)
        if draft is None or draft.base_len != base:
            raise WispError(ErrorCode.BASE_MISMATCH, f"no outstanding draft for session {sid}")
        if not 0 <= num_accepted <= len(draft.token_ids) or new_tokens[:num_accepted] != \
                draft.token_ids[:num_accepted]:
            raise WispError(ErrorCode.BAD_REQUEST,
                            f"verdict for session {sid} does not match its draft")
        self.runner.truncate(sid, min(self.runner.cached_len(sid), base + num_accepted))
        session.committed.extend(new_tokens)
        session.last_draft = None
        session.policy.observe(RoundFeedback(
            num_drafted=len(draft.token_ids), num_accepted=num_accepted,
            features=draft.features, draft_time_s=draft.draft_time_s,
            round_trip_s=round_trip_s))

    def resync(self, sid: str, committed: list[int]) -> None:
        """Adopt committed tokens decided elsewhere (another edge drove this session's round):
        keep the KV of the common prefix, drop the outstanding draft."""
        session = self._session(sid)
        common = 0
        for mine, theirs in zip(session.committed, committed, strict=False):
            if mine != theirs:
                break
            common += 1
        self.runner.truncate(sid, min(self.runner.cached_len(sid), common))
        session.committed = list(committed)
        session.last_draft = None

    # -- internals --------------------------------------------------------------------------
    def _session(self, sid: str) -> _Session:
        session = self.sessions.get(sid)
        if session is None:
            raise WispError(ErrorCode.UNKNOWN_SESSION, f"unknown session {sid}")
        return session

    def _round_limit(self, session: _Session) -> int:
        # A round commits up to k + 1 tokens; drafting past the output budget or the draft
        # model's context is pure waste.
        room = min(session.remaining - 1,
                   self.runner.max_positions - len(session.committed))
        return max(0, min(session.policy.round_limit(), self.k_max, room))

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
        """Pick each session's next draft token from logits [B, V].

        Returns (tokens [B], None) for greedy rows only, else (tokens, (ids [B][m], probs [B][m]))
        where rows of greedy sessions carry a one-hot sparse distribution.
        """
        tokens = logits.argmax(dim=-1).tolist()
        if all(self.sessions[sid].params.greedy for sid in sids):
            return tokens, None
        sparse_ids: list[list[int]] = []
        sparse_probs: list[list[float]] = []
        for row, sid in enumerate(sids):
            session = self.sessions[sid]
            if session.params.greedy:
                sparse_ids.append([tokens[row]])
                sparse_probs.append([1.0])
                continue
            ids, probs = draft_sparse(logits[row : row + 1], session.params)  # [1, m] each
            tokens[row] = int(sample_sparse(ids, probs, session.generator)[0])
            sparse_ids.append(ids[0].tolist())
            sparse_probs.append(probs[0].tolist())
        return tokens, (sparse_ids, sparse_probs)
