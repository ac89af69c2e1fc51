"""The sweep without a stack: the two arrival disciplines with a fake send, and the points, table
and plot inputs built from hand-made outcomes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from loadgen import sweep
from loadgen.report import RequestRecord
from loadgen.runner import ReplayOutcome, closed_loop, open_loop
from loadgen.workload import RequestSpec

SLO = {"ttft_slo_ms": 200.0, "tpot_slo_ms": 62.5}


class FakeSend:
    """Records when each request starts and how many are in flight; request i takes
    `durations[i]` seconds."""

    def __init__(self, durations: list[float], stop_after: int | None = None,
                 stop: asyncio.Event | None = None) -> None:
        self.durations, self.stop_after, self.stop = durations, stop_after, stop
        self.started: list[tuple[int, float]] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, i: int) -> None:
        self.started.append((i, time.perf_counter()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.durations[i])
        self.in_flight -= 1
        if self.stop_after is not None and len(self.started) >= self.stop_after:
            self.stop.set()


# -- arrival disciplines ----------------------------------------------------------------------
async def test_a_closed_loop_keeps_n_in_flight_in_workload_order() -> None:
    # Request 0 is slow: the other client works through 1, 2, 3 meanwhile.
    send = FakeSend([0.3, 0.01, 0.01, 0.01, 0.01])
    await closed_loop(5, 2, send, asyncio.Event())
    assert [i for i, _ in send.started] == [0, 1, 2, 3, 4]
    assert send.max_in_flight == 2
    t = dict(send.started)
    assert 0.03 <= t[4] - t[0] < 0.3  # each waited for its predecessor, not for the slow one


async def test_a_closed_loop_sends_each_request_once_with_more_clients_than_requests() -> None:
    send = FakeSend([0.0] * 3)
    await closed_loop(3, 16, send, asyncio.Event())
    assert sorted(i for i, _ in send.started) == [0, 1, 2] and send.max_in_flight == 3
    with pytest.raises(ValueError, match="concurrency"):
        await closed_loop(3, 0, send, asyncio.Event())


async def test_a_closed_loop_stops_taking_requests_once_the_budget_is_spent() -> None:
    stop = asyncio.Event()
    send = FakeSend([0.005] * 20, stop_after=4, stop=stop)
    await closed_loop(20, 2, send, stop)
    assert 4 <= len(send.started) <= 5  # the other client's request was already out


async def test_an_open_loop_sends_at_the_arrival_offsets_without_waiting() -> None:
    specs = [RequestSpec(i, arrival_s=a, prompt_tokens=4, output_tokens=2)
             for i, a in enumerate([0.0, 0.02, 0.04])]
    send = FakeSend([0.2, 0.1, 0.0])  # the first is slow; the others do not wait for it
    start = time.perf_counter()
    await open_loop(specs, send, asyncio.Event(), start)
    offsets = {i: t - start for i, t in send.started}
    assert 0.02 <= offsets[1] < offsets[2] < 0.2  # on time, not after the slow first one
    assert offsets[2] >= 0.04 and send.max_in_flight == 3
    stopped = asyncio.Event()
    stopped.set()
    none = FakeSend([0.0] * 3)
    await open_loop(specs, none, stopped, time.perf_counter())
    assert none.started == []


# -- points -----------------------------------------------------------------------------------
def rec(index: int, sent: float, ttft: float, n: int = 5, ok: bool = True,
        mode: str = "wisp") -> RequestRecord:
    """A request sent at `sent` s with a TTFT of `ttft` ms and a TPOT of 50 ms."""
    first = sent + ttft / 1000
    return RequestRecord(index=index, mode=mode, sent_s=sent, first_token_s=first,
                         done_s=first + 0.05 * (n - 1), num_tokens=n, ok=ok,
                         error_code=None if ok else "overloaded", sid=f"s{index}",
                         device="phone-lte", **SLO)


def outcome(ttfts: list[float], *, t0: float = 100.0, stopped: str | None = None,
            mode: str = "wisp") -> ReplayOutcome:
    records = [rec(i, t0 + i, ttft, mode=mode) for i, ttft in enumerate(ttfts)]
    return ReplayOutcome(records, duration_s=len(ttfts), stopped_early=stopped)


EDGES_OK = {"valid": True, "share_behind": 0.0, "rounds": 10, "behind": 0}


def test_a_point_pools_its_repeats_after_warm_up() -> None:
    # Two repeats of 4 requests 1 s apart; the first second of each is warm-up.
    first = outcome([1000.0, 100.0, 100.0, 300.0])  # warm-up, met, met, missed TTFT
    second = outcome([1000.0, 100.0, 100.0, 100.0], t0=200.0)
    p = sweep.point("wisp", "rate_scale", 2.0, [first, second], warmup_s=1.0, offered_rps=2.0,
                    edges=EDGES_OK)
    assert (p["mode"], p["rate_scale"], p["repeats"]) == ("wisp", 2.0, 2)
    assert (p["requests"], p["completed"], p["failed"], p["warmup"]) == (6, 6, 0, 2)
    assert p["slo_attainment"] == pytest.approx(5 / 6, abs=1e-4)
    assert p["attainments"] == [pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert p["duration_s"] == 6.0 and p["goodput_rps"] == pytest.approx(5 / 6, abs=1e-4)
    assert p["ttft_ms"]["p50"] == pytest.approx(100.0) and p["ttft_ms"]["n"] == 6
    assert p["tpot_ms"]["p50"] == pytest.approx(50.0)
    assert p["passed"] is False and p["stopped_early"] is None  # 83 % < 90 %
    assert p["edges_valid"] is True and p["edges_share_behind"] == 0.0


def test_a_stopped_point_never_passes_and_unjudged_edges_are_said() -> None:
    p = sweep.point("sled", "concurrency", 4, [outcome([100.0] * 3, stopped="error budget")],
                    warmup_s=0.0, offered_rps=None, edges={"valid": True, "rounds": 0,
                                                            "share_behind": 0.0})
    assert p["concurrency"] == 4 and p["stopped_early"] == "repeat 1: error budget"
    assert p["slo_attainment"] == 1.0 and p["passed"] is False
    assert p["edges_valid"] is None
    with pytest.raises(ValueError, match="axis"):
        sweep.point("sled", "qps", 1, [], warmup_s=0, offered_rps=None, edges=None)


def _points() -> list[dict]:
    good, slow = [100.0] * 4, [100.0, 900.0, 900.0, 900.0]
    return [sweep.point(mode, "rate_scale", load, [outcome(ttfts, mode=mode, stopped=stop)],
                        warmup_s=0.0, offered_rps=load * 0.5, edges=EDGES_OK)
            for mode, load, ttfts, stop in [("sled", 1.0, good, None), ("sled", 2.0, slow, None),
                                            ("wisp", 1.0, slow, "budget"),
                                            ("wisp", 2.0, slow, "budget")]]


def test_the_cdf_is_drawn_at_the_highest_passing_load_and_broken_modes_are_named() -> None:
    points = _points()
    assert sweep.cdf_loads(points, "rate_scale") == {"sled": (1.0, True), "wisp": (1.0, False)}
    assert sweep.broken_modes(points) == ["wisp"]
    assert sweep.broken_modes(points[:2]) == []


def test_plot_points_use_the_offered_rate_or_the_client_count() -> None:
    first = _points()[0]
    (pt,) = sweep.vs_load_points([first], "rate_scale")
    assert pt == {"mode": "sled", "load": 0.5, "slo_attainment": 1.0, "goodput_rps": 1.0,
                  "err": {"slo_attainment": None, "goodput_rps": None}}
    closed = dict(first, concurrency=8)
    assert sweep.vs_load_points([closed], "concurrency")[0]["load"] == 8


def test_the_table_has_one_row_per_point() -> None:
    points = _points()
    result = {"axis": "rate_scale", "points": points, "broken_modes": ["wisp"], "warmup_s": 0.0,
              "repeats": 1, "machine": "x86_64, 2 CPUs",
              "workload": {"trace": "t.csv", "requests": 4, "base_rps": 0.5,
                           "capped_to_model": 0, "slo_class": "standard",
                           "fleet": {"name": "phones"}}}
    text = sweep.markdown(result)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| mode | rate × | offered (req/s) |") and len(rows) == 5
    assert rows[1] == ("| sled | 1 | 0.5 | 4 / 0 | 100.0 % | 1 | 100.0 / 100.0 / 100.0 | "
                       "50.0 / 50.0 / 50.0 | yes |")
    assert "4 / 0 (stopped early)" in rows[3] and "25.0 %" in rows[3]
    assert "Every point of wisp" in text


# -- the driver, with a fake replay -----------------------------------------------------------
def test_the_driver_writes_every_point_table_and_plot(monkeypatch, tmp_path) -> None:
    """`loadgen sweep` end to end against a fake replay: wisp's every point hits the error
    budget (a broken mode: exit status 1), sled's run; the files hold both."""
    from loadgen import sweep_run
    from loadgen.cli import main
    from loadgen.job import Job

    specs = [RequestSpec(i, arrival_s=i * 0.5, prompt_tokens=8, output_tokens=5)
             for i in range(4)]
    job = Job(specs, set(), prompts=None, default_slo_class="standard", timeout_s=5.0,
              context=1024, fleet={"name": "none", "profiles": {}})
    calls = []

    async def fake_replay(url, specs, prompts, config, *, capped, concurrency, say, display):
        calls.append((config.mode, specs[-1].arrival_s, concurrency))
        stopped = "error budget" if config.mode == "wisp" else None
        return outcome([100.0] * len(specs), mode=config.mode, stopped=stopped)

    monkeypatch.setattr(sweep_run, "prepare", lambda args: job)
    monkeypatch.setattr(sweep_run, "replay", fake_replay)
    out = tmp_path / "out"
    assert main(["sweep", "--trace", "t.csv", "--modes", "sled,wisp", "--rates", "2,1",
                 "--repeats", "2", "--nats-url", "nats://unused", "--out-dir", str(out)]) == 1
    # Loads ascending; wisp's stopped repeat ends its point.
    assert calls == [("sled", 1.5, None)] * 2 + [("sled", 0.75, None)] * 2 + \
        [("wisp", 1.5, None), ("wisp", 0.75, None)]
    result = json.loads((out / "sweep.json").read_text())
    assert [(p["mode"], p["rate_scale"], p["repeats"]) for p in result["points"]] == \
        [("sled", 1.0, 2), ("sled", 2.0, 2), ("wisp", 1.0, 1), ("wisp", 2.0, 1)]
    assert result["broken_modes"] == ["wisp"] and result["partition"] is None
    assert result["modes"]["sled"]["cdf_at"] == 2.0
    assert result["points"][1]["offered_rps"] == 4.0  # 3 gaps in 0.75 s
    table = (out / "sweep.md").read_text()
    assert table.count("| sled |") == 2 and table.count("(stopped early)") == 2
    for name in ("vs_load.png", "cdf.png", "over_time_sled.png", "over_time_wisp.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calls.clear()
    assert main(["sweep", "--trace", "t.csv", "--modes", "sled", "--concurrency", "3",
                 "--nats-url", "nats://unused", "--out-dir", str(out)]) == 0
    assert calls == [("sled", 1.5, 3)]
