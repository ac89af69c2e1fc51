"""Which queued verify requests a verifier runs next: the `BatchPolicy` interface and FCFS.

Pure Python, no NATS: the scheduler hands a policy one verifier's queue (in arrival order; a
retried ``(sid, round)`` keeps its place), the time and what is known of the verifier, and
publishes the entries the policy picks as one `VerifierBatch`. FCFS is SLED's batching; the
SLO-aware policy of WISP (urgent EDF queue + utility knapsack under the latency estimator,
papers/wisp_summary.txt) slots in behind the same `select`.

Rules every policy keeps:
* the result is a subset of the queue, in the order the batch should list it;
* no two entries of one session in a batch (a later round of a sid waits for the next batch:
  its base length depends on the earlier round's outcome);
* an empty result means "nothing to run now"; the scheduler asks again on the next event
  (submit, done, heartbeat) or check tick (every few hundred ms).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from common.protocol import BatchDone, VerifyRequest

__all__ = [
    "POLICIES",
    "BatchPolicy",
    "FCFSPolicy",
    "PendingVerify",
    "VerifierState",
    "make_policy",
]


@dataclass(slots=True)
class PendingVerify:
    """A verify request waiting in the scheduler. Times are the scheduler's wall clock (ms)."""

    request: VerifyRequest
    reply_to: str  # the edge's reply inbox; the verifier answers there
    arrival_ms: float
    deadline_ms: float  # arrival + budget - downlink estimate

    @property
    def sid(self) -> str:
        return self.request.sid

    @property
    def key(self) -> tuple[str, int]:
        """Rounds are idempotent per (sid, round): a retry has the same key."""
        return self.request.sid, self.request.round

    @property
    def num_tokens(self) -> int:
        """Tokens this request adds to a batch: its draft plus the bonus position."""
        return len(self.request.draft_ids) + 1


@dataclass(slots=True, frozen=True)
class VerifierState:
    """What a policy may know about the verifier it fills a batch for."""

    verifier_id: str
    model: str = ""
    hardware: str = ""
    free_blocks: int = 0
    total_blocks: int = 0
    recent_done: tuple[BatchDone, ...] = field(default=())  # oldest first (estimator feedback)


class BatchPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> list[PendingVerify]:
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

    def select(self, queue: Sequence[PendingVerify], now_ms: float,
               verifier: VerifierState) -> list[PendingVerify]:
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
        return batch


POLICIES: dict[str, Callable[..., BatchPolicy]] = {FCFSPolicy.name: FCFSPolicy}


def make_policy(name: str, *, max_batch_size: int, max_batch_tokens: int) -> BatchPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown batch policy {name!r}; choose one of "
                         f"{', '.join(sorted(POLICIES))}") from None
    return factory(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
