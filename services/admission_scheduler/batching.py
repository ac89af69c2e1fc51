"""Which queued verify requests a verifier runs next: the `BatchPolicy` interface and FCFS.

Pure Python, no NATS: the scheduler hands a policy one verifier's queue (in arrival order; a
retried ``(sid, round)`` keeps its place), the time and what is known of the verifier, and
publishes the entries the policy picks as one `VerifierBatch`. Each entry carries what a
deadline-aware policy needs: its absolute deadline, the session's SLO, and the round's shape as
the session table predicts it (tokens to feed, cached tokens to read: a cold prefill feeds the
whole context). FCFS is SLED's batching; the SLO-aware policy of WISP (an urgent EDF queue and a
utility knapsack under the latency estimator) slots in behind the same `select`.

Rules every policy keeps:
* the result's entries are a subset of the queue, in the order the batch should list them;
* no two entries of one session in a batch (a later round of a sid waits for the next batch:
  its base length depends on the earlier round's outcome);
* empty entries mean "nothing to run now"; the scheduler asks again on the next event (submit,
  done, heartbeat), at the selection's ``wake_at_ms`` if it gives one (e.g. the earliest latest
  start time of a request it holds back), and on its periodic check.

A policy is built from the scheduler's config by its own ``from_config``: each reads the fields
it needs, so adding a policy touches neither the scheduler nor the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.protocol import BatchDone, ModelLimits, Slo, VerifyRequest

__all__ = [
    "POLICIES",
    "BatchPolicy",
    "FCFSPolicy",
    "PendingVerify",
    "Selection",
    "VerifierState",
    "make_policy",
]


@dataclass(slots=True)
class PendingVerify:
    """A verify request waiting in the scheduler. Times are the scheduler's wall clock (ms)."""

    request: VerifyRequest
    reply_to: str  # the edge's reply inbox; the verifier answers there
    arrival_ms: float
    deadline_ms: float  # arrival + budget - downlink estimate (kept across retries)
    slo: Slo | None = None
    num_new: int = 0  # tokens the round feeds (uncached committed tokens + the draft)
    num_cached: int = 0  # cached tokens it reads

    @property
    def sid(self) -> str:
        return self.request.sid

    @property
    def key(self) -> tuple[str, int]:
        """Rounds are idempotent per (sid, round): a retry has the same key."""
        return self.request.sid, self.request.round

    @property
    def num_tokens(self) -> int:
        """Positions the request verifies: its draft plus the bonus position."""
        return len(self.request.draft_ids) + 1


@dataclass(slots=True, frozen=True)
class VerifierState:
    """What a policy may know about the verifier it fills a batch for."""

    verifier_id: str
    model: str = ""
    hardware: str = ""
    free_blocks: int = 0
    total_blocks: int = 0
    block_size: int = 1
    limits: ModelLimits | None = None
    batches_in_flight: int = 0
    recent_done: tuple[BatchDone, ...] = field(default=())  # oldest first (estimator feedback)


@dataclass(slots=True)
class Selection:
    entries: list[PendingVerify]
    wake_at_ms: float | None = None  # ask again at this time even if nothing else happens


class BatchPolicy(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> BatchPolicy:
        """Build from the scheduler's config, reading the fields this policy needs."""

    @abstractmethod
    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> Selection:
        """The entries of `queue` to run next on `verifier` (see the module's rules)."""


class FCFSPolicy(BatchPolicy):
    """First come, first served: entries in arrival order until `max_batch_size` entries or
    `max_batch_tokens` tokens (Σ draft + 1). The first entry always goes, so a request larger
    than the token cap runs alone rather than never. An entry that does not fit ends the batch
    (no overtaking); only a second round of a sid already in the batch is skipped over."""

    name = "fcfs"

    def __init__(self, max_batch_size: int = 32, max_batch_tokens: int = 8192):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_batch_tokens "
                             f"({max_batch_tokens}) must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_config(cls, config: Any) -> FCFSPolicy:
        return cls(max_batch_size=config.max_batch_size,
                   max_batch_tokens=config.max_batch_tokens)

    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> Selection:
        batch: list[PendingVerify] = []
        sids: set[str] = set()
        num_tokens = 0
        for entry in queue:
            if len(batch) >= self.max_batch_size:
                break
            if entry.sid in sids:
                continue
            if batch and num_tokens + entry.num_tokens > self.max_batch_tokens:
                break
            batch.append(entry)
            sids.add(entry.sid)
            num_tokens += entry.num_tokens
        return Selection(batch)


POLICIES: dict[str, type[BatchPolicy]] = {FCFSPolicy.name: FCFSPolicy}


def make_policy(name: str, config: Any) -> BatchPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown batch policy {name!r}; choose one of "
                         f"{', '.join(sorted(POLICIES))}") from None
    return cls.from_config(config)
