"""The load generator's report: hand-built records with known timestamps → exact metrics,
Markdown and PNG plots (no NATS)."""

from __future__ import annotations

import json

import pytest

from common.protocol import RoundEvent
from loadgen.report import (
    RequestRecord,
    RoundSample,
    capacity,
    markdown,
    percentile,
    plot_cdfs,
    plot_over_time,
    plot_vs_load,
    summarize,
    write_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Timestamps and bounds are binary fractions, so every derived number is exact (no float slack
# at the SLO boundary).
SLO = {"ttft_slo_ms": 200.0, "tpot_slo_ms": 62.5}


def rec(index: int, sent: float, first: float | None, done: float | None, n: int, *,
        ok: bool = True, mode: str = "wisp", slo: dict | None = SLO, **kw) -> RequestRecord:
    return RequestRecord(index=index, mode=mode, sent_s=sent, first_token_s=first, done_s=done,
                         num_tokens=n, ok=ok, **(slo or {}), **kw)


def run_records(mode: str = "wisp") -> list[RequestRecord]:
    """Seven requests over 10 s: TTFT 125/250/62.5/31.25 ms, TPOT 62.5/62.5/125/— ms; two
    meet the SLO (200 ms, 62.5 ms; one exactly at its bound), one failed, one timed out, one
    never answered."""
    return [
        rec(0, 10.0, 10.125, 10.375, 5, mode=mode, server_ttft_ms=120.0,
            server_tpot_ms=60.5),  # met, TPOT == bound
        rec(1, 11.0, 11.25, 11.5, 5, mode=mode, server_ttft_ms=250.0),  # TTFT too slow
        rec(2, 12.0, 12.0625, 12.5625, 5, mode=mode, server_ttft_ms=52.5,
            server_tpot_ms=125.0),  # TPOT too slow
        rec(3, 13.0, 13.03125, 13.03125, 1, mode=mode, server_tpot_ms=0.0),  # one token: met
        rec(4, 14.0, 14.125, 14.25, 2, mode=mode, ok=False, error_code="internal"),
        rec(5, 15.0, None, 20.0, 0, mode=mode, ok=False, error_code="RequestTimeout"),
        rec(6, 16.0, None, None, 0, mode=mode, ok=False),  # never answered
    ]


# -- records --------------------------------------------------------------------------------
def test_record_timings_are_exact():
    r = run_records()[0]
    assert (r.ttft_ms, r.tpot_ms, r.e2e_ms) == (125.0, 62.5, 375.0)  # TPOT (375 - 125) / 4
    assert r.met_slo is True  # TPOT at its bound meets it
    assert run_records()[1].met_slo is False and run_records()[2].met_slo is False


def test_record_edge_cases():
    one = rec(0, 1.0, 1.5, 1.5, 1)
    assert one.tpot_ms == 0.0 and one.met_slo is False  # TTFT 500 > 200
    never = rec(1, 1.0, None, None, 0, ok=False)
    assert never.ttft_ms is None and never.tpot_ms is None and never.e2e_ms is None
    assert never.met_slo is False
    assert rec(2, 1.0, 1.1, 1.2, 3, slo=None).met_slo is None  # no SLO, not a miss
    # One bound only: the other does not constrain.
    assert rec(3, 1.0, 1.1, 2.1, 3, slo={"ttft_slo_ms": 200.0}).met_slo is True
    assert rec(4, 1.0, None, 1.2, 0).met_slo is False  # completed without a token
    assert rec(5, 1.0, 1.1, 1.2, 3, ok=False).met_slo is False  # failed


def test_round_sample_from_event():
    ev = RoundEvent(ts_ms=1500.0, sid="s" * 8, mode="sled", round=0, drafted=4, accepted=3,
                    committed=4, draft_ms=1.0, wasted_draft_ms=0.0, rtt_ms=1.0, budget_ms=0.0,
                    batch_size=6)
    assert RoundSample.from_event(ev) == RoundSample(t_s=1.5, mode="sled", batch_size=6,
                                                     accepted=3, drafted=4)


# -- summary --------------------------------------------------------------------------------
def test_percentile_interpolates_linearly():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([20.0, 50.0, 100.0, 250.0], 90) == pytest.approx(205.0)


def test_summary_counts_and_rates():
    s = summarize(run_records(), duration_s=10.0, offered_rps=0.7)
    assert (s["requests"], s["completed"], s["failed"], s["unfinished"]) == (7, 4, 3, 1)
    assert s["errors_by_code"] == {"RequestTimeout": 1, "internal": 1, "unfinished": 1}
    assert s["warmup"] == 0 and s["capped"] == 0 and s["modes"] == ["wisp"]
    assert s["slo"] == "all" and (s["requests_with_slo"], s["slo_met"]) == (7, 2)
    assert s["slo_attainment"] == pytest.approx(2 / 7, abs=1e-4)
    assert s["goodput_rps"] == pytest.approx(0.2)  # two met / 10 s
    assert s["goodput_tokens_per_s"] == pytest.approx(0.6)  # (5 + 1) tokens / 10 s
    assert s["output_tokens"] == 18
    assert s["throughput_tokens_per_s"] == pytest.approx(1.8)
    assert s["offered_rps"] == 0.7 and s["sent_rps"] == pytest.approx(0.7)
    assert s["achieved_rps"] == pytest.approx(0.4)
    assert s["duration_s"] == 10.0


def test_summary_latency_percentiles():
    s = summarize(run_records(), duration_s=10.0)
    # Completed only; TTFT [31.25, 62.5, 125, 250].
    assert s["ttft_ms"] == {"p50": 93.75, "p90": 212.5, "p99": 246.25,
                            "mean": pytest.approx(117.1875, abs=1e-3), "n": 4}
    # TPOT of requests with >= 2 tokens: [62.5, 62.5, 125].
    assert s["tpot_ms"] == {"p50": 62.5, "p90": 112.5, "p99": 123.75, "mean": 83.333, "n": 3}
    # E2E [31.25, 375, 500, 562.5].
    assert s["e2e_ms"] == {"p50": 437.5, "p90": 543.75, "p99": 560.625,
                           "mean": pytest.approx(367.1875, abs=1e-3), "n": 4}


def test_summary_agreement_with_server_timings():
    a = summarize(run_records(), duration_s=10.0)["agreement"]
    # TTFT gaps [5, 0, 10]; TPOT gaps [2, 0] (the one-token request is left out).
    assert a["ttft_ms"] == {"n": 3, "max": 10.0, "p99": 9.9}
    assert a["tpot_ms"] == {"n": 2, "max": 2.0, "p99": 1.98}


def test_summary_excludes_warmup():
    records = [rec(0, 100.0, 100.875, 101.0, 2), rec(1, 101.0, 101.875, 102.0, 2),
               rec(2, 105.0, 105.125, 105.1875, 2, capped=True),
               rec(3, 106.0, 106.125, 106.1875, 2)]
    s = summarize(records, duration_s=4.0, warmup_s=5.0)
    assert s["warmup"] == 2 and s["requests"] == 2 and s["capped"] == 1
    assert s["slo_attainment"] == 1.0  # the slow warm-up requests do not count
    assert s["ttft_ms"]["p99"] == 125.0
    assert s["goodput_rps"] == 0.5


def test_summary_without_slo_is_none_not_zero():
    s = summarize([rec(i, float(i), i + 0.1, i + 0.2, 3, slo=None) for i in range(3)],
                  duration_s=3.0)
    assert s["slo"] == "none" and s["requests_with_slo"] == 0
    assert s["slo_attainment"] is None
    assert s["goodput_rps"] is None and s["goodput_tokens_per_s"] is None
    assert s["throughput_tokens_per_s"] == 3.0
    assert "no SLO" in markdown(s, title="t")


def test_summary_partial_slo_counts_only_requests_with_one():
    s = summarize([rec(0, 0.0, 0.1, 0.2, 3), rec(1, 1.0, 1.1, 1.2, 3, slo=None)],
                  duration_s=2.0)
    assert s["slo"] == "partial" and s["slo_attainment"] == 1.0 and s["goodput_rps"] == 0.5


def test_summary_of_nothing():
    s = summarize([], duration_s=0.0)
    assert s["requests"] == 0 and s["slo_attainment"] is None and s["achieved_rps"] is None
    assert s["ttft_ms"] == {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    assert s["agreement"]["ttft_ms"] == {"n": 0, "max": None, "p99": None}
    markdown(s, title="empty")  # renders
    with pytest.raises(ValueError):
        summarize([], duration_s=-1.0)


def test_capacity_is_highest_load_at_90_percent():
    points = [{"mode": "wisp", "load": 1, "slo_attainment": 0.99},
              {"mode": "wisp", "load": 4, "slo_attainment": 0.91},
              {"mode": "wisp", "load": 8, "slo_attainment": 0.5},
              {"mode": "sled", "load": 1, "slo_attainment": 0.8},
              {"mode": "none", "load": 1, "slo_attainment": None}]
    assert capacity(points) == {"wisp": 4, "sled": None, "none": None}


# -- output ---------------------------------------------------------------------------------
def test_write_json_round_trips(tmp_path):
    s = summarize(run_records(), duration_s=10.0)
    path = tmp_path / "sub" / "result.json"
    write_json(s, path)
    assert json.loads(path.read_text()) == s


def test_markdown_contains_the_numbers():
    text = markdown(summarize(run_records(), duration_s=10.0, offered_rps=0.7), title="run A")
    assert text.startswith("## run A")
    for needle in ("| requests (measured) | 7 |", "| completed | 4 |",
                   "RequestTimeout: 1", "internal: 1", "unfinished: 1",
                   "28.6 % (2 of 7)", "| goodput (req/s) | 0.200 |",
                   "| goodput (tok/s) | 0.60 |", "| throughput (tok/s) | 1.80 |",
                   "| TTFT | 93.75 | 212.50 | 246.25 | 117.19 | 4 |",
                   "| TPOT | 62.50 | 112.50 | 123.75 | 83.33 | 3 |",
                   "| TTFT | 10.00 | 9.90 | 3 |", "linear interpolation"):
        assert needle in text, needle


# -- plots ----------------------------------------------------------------------------------
def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("modes", [["wisp"], ["wisp", "sled", "centralized"]])
def test_plot_cdfs(tmp_path, modes):
    path = tmp_path / "cdf.png"
    plot_cdfs({m: run_records(m) for m in modes}, path)
    assert_png(path)


@pytest.mark.parametrize("modes", [["wisp"], ["wisp", "sled"]])
def test_plot_vs_load(tmp_path, modes):
    points = [{"mode": m, "load": load, "slo_attainment": att, "goodput_rps": load * att,
               "err": 0.05}
              for m in modes for load, att in ((1.0, 1.0), (2.0, 0.92), (4.0, 0.6))]
    points.append({"mode": modes[0], "load": 8.0, "slo_attainment": None, "goodput_rps": None,
                   "err": {"slo_attainment": None, "goodput_rps": 0.1}})
    path = tmp_path / "load.png"
    plot_vs_load(points, path)
    assert_png(path)


@pytest.mark.parametrize("modes", [["wisp"], ["wisp", "ucb"]])
def test_plot_over_time(tmp_path, modes):
    samples = [RoundSample(t_s=100.0 + i * 0.1, mode=m, batch_size=1 + i % 8,
                           accepted=i % 5, drafted=4)
               for m in modes for i in range(200)]
    path = tmp_path / "time.png"
    plot_over_time(samples, path)
    assert_png(path)


def test_plots_without_data(tmp_path):
    plot_cdfs({}, tmp_path / "a.png")
    plot_cdfs({"wisp": [rec(0, 0.0, None, None, 0, ok=False)]}, tmp_path / "b.png")
    plot_vs_load([], tmp_path / "c.png")
    plot_over_time([], tmp_path / "d.png")
    plot_over_time([RoundSample(t_s=1.0, mode="wisp", batch_size=2, accepted=1, drafted=2)],
                   tmp_path / "e.png")
    for name in "abcde":
        assert_png(tmp_path / f"{name}.png")
