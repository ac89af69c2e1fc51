"""Edge-side pieces without NATS: device-profile emulation, draft batching, detokenizing."""

import asyncio
import time

import pytest

from common.engine.draft_batcher import DraftBatcher
from common.transport.generation import Detokenizer
from services.edge_drafter.device_profile import DeviceProfile, LinkEmulator, get_profile


def test_link_delays_follow_the_profile_and_repeat_with_the_seed():
    p = DeviceProfile("t", draft_ms_per_token=10.0, rtt_ms=40.0, jitter_ms=6.0,
                      uplink_kbps=8_000, downlink_kbps=16_000)
    a, b = LinkEmulator(p, seed=7), LinkEmulator(p, seed=7)
    ups = [a.uplink_delay_s(1000) for _ in range(50)]
    assert ups == [b.uplink_delay_s(1000) for _ in range(50)]
    # 20 ms half RTT + 1000 B at 8 Mbit/s = 1 ms, plus jitter in [0, 6] ms.
    assert all(0.021 - 1e-9 <= u <= 0.027 + 1e-9 for u in ups)
    assert 0.0205 <= a.downlink_delay_s(1000) <= 0.0265
    # Drafting 4 tokens should take 40 ms; 15 ms were really spent.
    assert a.draft_delay_s(4, 0.015) == pytest.approx(0.025)
    assert a.draft_delay_s(4, 0.100) == 0.0


def test_profiles_by_name():
    assert get_profile("") is None and get_profile("none") is None
    assert get_profile("4g").rtt_ms > get_profile("lan").rtt_ms
    with pytest.raises(ValueError, match="known"):
        get_profile("carrier-pigeon")
    with pytest.raises(ValueError):
        DeviceProfile("bad", rtt_ms=-1)


class StepCore:
    """Stands in for DrafterCore's step-wise API: session s drafts `lengths[s]` steps (1 by
    default); records which sessions shared each step."""

    def __init__(self, lengths: dict[str, int] | None = None, step_s: float = 0.0):
        self.lengths, self.step_s = lengths or {}, step_s
        self.active: dict[str, int] = {}
        self.steps: list[list[str]] = []
        self.fail_step: Exception | None = None

    def begin(self, sids):
        for sid in sids:
            if sid == "unknown":
                raise KeyError(sid)
        self.active.update(dict.fromkeys(sids, 0))
        return {}

    @property
    def drafting(self) -> int:
        return len(self.active)

    def step(self):
        time.sleep(self.step_s)
        self.steps.append(sorted(self.active))
        if self.fail_step is not None:
            exc, self.fail_step = self.fail_step, None
            self.active.clear()
            raise exc
        done = {}
        for sid in list(self.active):
            self.active[sid] += 1
            if self.active[sid] >= self.lengths.get(sid, 1):
                del self.active[sid]
                done[sid] = f"draft-{sid}"
        return done


async def test_sessions_asking_together_share_one_draft_step():
    core = StepCore()
    batcher = DraftBatcher(core)
    try:
        got = await asyncio.gather(*(batcher.draft(s) for s in ("a", "b", "c")))
        assert got == ["draft-a", "draft-b", "draft-c"]
        assert core.steps == [["a", "b", "c"]]
        assert await batcher.draft("a") == "draft-a"
        assert core.steps[-1] == ["a"]
    finally:
        batcher.shutdown()


async def test_a_late_session_joins_at_the_next_step_not_after_the_long_draft():
    """Continuous batching: b, ready while a drafts 20 steps, is done before a."""
    core = StepCore({"a": 20, "b": 2}, step_s=0.005)
    batcher = DraftBatcher(core)
    try:
        a = asyncio.ensure_future(batcher.draft("a"))
        while len(core.steps) < 3:
            await asyncio.sleep(0.001)
        assert await batcher.draft("b") == "draft-b"
        assert not a.done()
        assert await a == "draft-a"
        shared = [s for s in core.steps if s == ["a", "b"]]
        assert len(shared) == 2 and len(core.steps) == 20
    finally:
        batcher.shutdown()


async def test_a_failing_draft_reaches_every_waiter_and_the_batcher_goes_on():
    core = StepCore()
    core.fail_step = RuntimeError("boom")
    batcher = DraftBatcher(core)
    try:
        results = await asyncio.gather(batcher.draft("a"), batcher.draft("b"),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await batcher.draft("a") == "draft-a"
    finally:
        batcher.shutdown()


async def test_a_session_that_cannot_start_fails_alone():
    batcher = DraftBatcher(StepCore())
    try:
        results = await asyncio.gather(batcher.draft("a"), batcher.draft("unknown"),
                                       return_exceptions=True)
        assert results[0] == "draft-a" and isinstance(results[1], KeyError)
    finally:
        batcher.shutdown()


class ByteTokenizer:
    """Each id is one byte of UTF-8 — enough to split a character across tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_back_a_split_character():
    d = Detokenizer(ByteTokenizer())
    e_acute = "é".encode()  # two bytes
    assert d.push(list(b"caf")) == "caf"
    assert d.push(list(b"caf") + [e_acute[0]]) == ""  # half a character: wait
    assert d.push(list(b"caf") + list(e_acute)) == "é"
    assert d.push(list(b"caf") + list(e_acute) + [e_acute[0]], final=True) == "\ufffd"
