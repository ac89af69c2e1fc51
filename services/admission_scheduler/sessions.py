"""The scheduler's session table: what it knows of each session it routes.

Pure Python, no NATS or Redis. An entry holds the session's verifier, what the session needs of
a verifier (its `SessionSpec`: k_max, output budget, SLO; its vocabulary; its prompt length)
and where it stands: its committed length and how many of those tokens the verifier holds KV
for, as the verifier last reported (`BatchDone.sessions`). From that a policy can tell a cold
prefill from a warm verify before dispatch: a round feeds committed - cached + k tokens and
reads the cached ones.

A session learned from Redis (after a scheduler restart) gets its entry from the stored record;
one known only by the verifier a request names has no spec until then.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from common.protocol import MAX_DRAFT_TOKENS, BatchDone, SessionSpec, VocabInfo

__all__ = ["SessionEntry", "SessionTable"]


@dataclass(slots=True)
class SessionEntry:
    sid: str
    verifier_id: str
    last_seen_ms: float
    spec: SessionSpec | None = None
    vocab: VocabInfo | None = None
    prompt_len: int = 0
    committed_len: int = 0
    cached_len: int = 0  # tokens its verifier holds KV for (0 on a verifier that never had it)
    # Its latest round on this scheduler's clock: when it was submitted and when its batch's
    # forward ended (0: not yet) — the server's share of the edge's next measured round trip.
    last_round: int = -1
    round_arrival_ms: float = 0.0
    round_done_ms: float = 0.0
    server_budget_ms: float | None = None  # its last round's budget less the downlink estimate
    tokens_per_round: float = 0.0  # committed tokens per verified round (moving average)

    @property
    def needed_context(self) -> int:
        """Positions the session may use: prompt + output budget + one round's draft."""
        if self.spec is None:
            return 0
        return self.prompt_len + self.spec.max_new_tokens + self.spec.k_max


class SessionTable:
    def __init__(self) -> None:
        self.entries: dict[str, SessionEntry] = {}
        self._by_verifier: defaultdict[str, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, sid: str) -> SessionEntry | None:
        return self.entries.get(sid)

    def verifier_of(self, sid: str) -> str | None:
        entry = self.entries.get(sid)
        return entry.verifier_id if entry else None

    def sids_of(self, vid: str) -> set[str]:
        return set(self._by_verifier.get(vid, ()))

    def cached_blocks(self, vid: str, block_size: int, skip: set[str]) -> int:
        """KV blocks `vid` holds for its sessions not in `skip`, by their cached lengths."""
        size = max(1, block_size)
        entries = self.entries
        return sum(-(-entries[sid].cached_len // size)
                   for sid in self._by_verifier.get(vid, ()) if sid not in skip)

    def num_sessions(self, vid: str) -> int:
        return len(self._by_verifier.get(vid, ()))

    def add(self, sid: str, vid: str, now_ms: float, *, spec: SessionSpec | None = None,
            vocab: VocabInfo | None = None, prompt_len: int = 0,
            committed_len: int = 0) -> SessionEntry:
        """Record a session on `vid`, or learn more of a known one (its spec, lengths)."""
        entry = self.entries.get(sid)
        if entry is None:
            entry = self.entries[sid] = SessionEntry(sid, vid, now_ms)
            self._by_verifier[vid].add(sid)
        elif entry.verifier_id != vid:
            self.move(sid, vid)
        if spec is not None:
            entry.spec, entry.vocab, entry.prompt_len = spec, vocab, prompt_len
            entry.committed_len = max(entry.committed_len, committed_len)
        return entry

    def move(self, sid: str, vid: str) -> None:
        """Place a known session on another verifier, which holds none of its KV yet."""
        entry = self.entries[sid]
        self._by_verifier[entry.verifier_id].discard(sid)
        entry.verifier_id, entry.cached_len = vid, 0
        self._by_verifier[vid].add(sid)

    def touch(self, sid: str, now_ms: float) -> None:
        entry = self.entries.get(sid)
        if entry is not None:
            entry.last_seen_ms = now_ms

    def forget(self, sid: str) -> None:
        entry = self.entries.pop(sid, None)
        if entry is not None:
            self._by_verifier[entry.verifier_id].discard(sid)

    def forget_idle(self, now_ms: float, max_idle_ms: float) -> int:
        """Drop sessions unseen for `max_idle_ms` (expired or closed elsewhere); Redis still has
        the placement if one comes back."""
        idle = [sid for sid, e in self.entries.items() if now_ms - e.last_seen_ms > max_idle_ms]
        for sid in idle:
            self.forget(sid)
        return len(idle)

    def report(self, done: BatchDone) -> None:
        """A verifier's report of where its batch's sessions stand."""
        for length in done.sessions:
            entry = self.entries.get(length.sid)
            if entry is not None and entry.verifier_id == done.verifier_id:
                grown = length.committed_len - entry.committed_len
                if 0 < grown <= MAX_DRAFT_TOKENS + 1:  # one round's tokens (a learned or
                    # moved session's first report may jump further)
                    entry.tokens_per_round = (grown if entry.tokens_per_round == 0 else
                                              0.8 * entry.tokens_per_round + 0.2 * grown)
                entry.committed_len = length.committed_len
                entry.cached_len = length.cached_len

    def submitted(self, entry: SessionEntry, round: int, now_ms: float,
                  server_budget_ms: float | None) -> None:
        """A round of `entry` arrived; a retry of the latest round keeps its first arrival."""
        if round != entry.last_round:
            entry.last_round, entry.round_arrival_ms, entry.round_done_ms = round, now_ms, 0.0
        entry.server_budget_ms = server_budget_ms

    def round_done(self, sid: str, round: int, now_ms: float) -> None:
        """The forward of `sid`'s `round` ended (its batch's `done`)."""
        entry = self.entries.get(sid)
        if entry is not None and entry.last_round == round:
            entry.round_done_ms = now_ms

    def round_server_ms(self, entry: SessionEntry, round: int) -> float | None:
        """The scheduler-side time of `round` (arrival to its forward's end), when known."""
        if entry.last_round != round or entry.round_done_ms <= 0:
            return None
        return entry.round_done_ms - entry.round_arrival_ms

    def round_shape(self, sid: str, base_len: int, k: int) -> tuple[int, int]:
        """(tokens a round of k drafted tokens from `base_len` feeds, cached tokens it reads),
        from the verifier's last report; an unknown session counts as a cold prefill."""
        entry = self.entries.get(sid)
        cached = min(entry.cached_len, max(0, base_len - 1)) if entry else 0
        return base_len - cached + k, cached
