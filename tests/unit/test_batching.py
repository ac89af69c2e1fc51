"""FCFS batch selection: order, size and token caps, one entry per session, edge cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.protocol import VerifyRequest
from services.admission_scheduler.batching import (
    FCFSPolicy,
    PendingVerify,
    VerifierState,
    make_policy,
)

STATE = VerifierState(verifier_id="v1", free_blocks=100, total_blocks=100)


def pending(sid: str, round: int = 0, k: int = 3, arrival_ms: float = 0.0) -> PendingVerify:
    request = VerifyRequest(sid=sid, round=round, base_len=10 + round, draft_ids=[1] * k,
                            budget_ms=100.0, draft_ms=1.0, device_id="dev")
    return PendingVerify(request=request, reply_to=f"_INBOX.{sid}.{round}",
                         arrival_ms=arrival_ms, deadline_ms=arrival_ms + 100.0)


def queue_of(n: int, k: int = 3) -> list[PendingVerify]:
    return [pending(f"s{i}", k=k, arrival_ms=float(i)) for i in range(n)]


def test_fcfs_keeps_arrival_order() -> None:
    queue = queue_of(5)
    assert FCFSPolicy().select(queue, 0.0, STATE).entries == queue


def test_max_batch_size() -> None:
    queue = queue_of(10)
    assert FCFSPolicy(max_batch_size=4).select(queue, 0.0, STATE).entries == queue[:4]


def test_token_cap_counts_draft_plus_one_and_stops_at_first_misfit() -> None:
    # 4 tokens each: three fit in 12, the fourth would make 16.
    queue = queue_of(3, k=3) + [pending("big", k=20), pending("small", k=0)]
    chosen = FCFSPolicy(max_batch_tokens=12).select(queue, 0.0, STATE).entries
    assert chosen == queue[:3]  # "small" would fit but does not overtake "big"


def test_lone_oversized_request_goes_alone() -> None:
    queue = [pending("huge", k=40), pending("s1", k=1)]
    assert FCFSPolicy(max_batch_tokens=8).select(queue, 0.0, STATE).entries == queue[:1]


def test_no_two_entries_of_one_session() -> None:
    queue = [pending("a", 0), pending("a", 1), pending("b", 0), pending("a", 2),
             pending("c", 0)]
    chosen = FCFSPolicy().select(queue, 0.0, STATE).entries
    assert [(p.sid, p.request.round) for p in chosen] == [("a", 0), ("b", 0), ("c", 0)]


def test_skipped_duplicate_does_not_use_a_batch_slot() -> None:
    queue = [pending("a", 0), pending("a", 1), pending("b", 0)]
    chosen = FCFSPolicy(max_batch_size=2).select(queue, 0.0, STATE).entries
    assert [p.sid for p in chosen] == ["a", "b"]


def test_empty_queue() -> None:
    assert FCFSPolicy().select([], 0.0, STATE).entries == []


def test_fcfs_never_asks_to_be_woken() -> None:
    assert FCFSPolicy().select(queue_of(3), 0.0, STATE).wake_at_ms is None


def test_make_policy_builds_from_the_config() -> None:
    config = SimpleNamespace(max_batch_size=3, max_batch_tokens=99, other_policys_field=1)
    policy = make_policy("fcfs", config)
    assert isinstance(policy, FCFSPolicy)
    assert (policy.max_batch_size, policy.max_batch_tokens) == (3, 99)
    with pytest.raises(ValueError, match="unknown batch policy 'nope'"):
        make_policy("nope", config)
    with pytest.raises(ValueError):
        FCFSPolicy(max_batch_size=0)
