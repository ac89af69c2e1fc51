"""loadgen against the real stack: a short slice of the shipped Azure trace replayed through the
SDK, every request completing, the report's counts matching the slice, and its TTFT/TPOT
agreeing with the client's own timestamps and with what the server measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.cli import main
from services.stack.launcher import stack_options, start_stack, stop_stack

pytestmark = pytest.mark.slow
TRACE = Path(__file__).resolve().parents[2] / "loadgen" / "traces" / \
    "AzureLLMInferenceTrace_code.csv"


@pytest.fixture(scope="module")
def stack(nats_url, redis_url, tmp_path_factory):
    s = start_stack(stack_options(
        nats_url=nats_url, redis_url=redis_url, verifiers=1, device="cpu",
        state_dir=str(tmp_path_factory.mktemp("loadgen") / ".wisp"),
        extra_env={"OMP_NUM_THREADS": "1"}))
    yield s
    stop_stack(s)


@pytest.mark.parametrize("mode", ["sled", "wisp"])
def test_a_trace_slice_replays_through_the_stack(stack, tmp_path, capsys, mode) -> None:
    out = tmp_path / "result.json"
    # 8 rows from row 100 (their contexts of 1-8k tokens are capped to the tiny target's),
    # compressed 4x in time, 12 output tokens each.
    assert main(["replay", "--trace", str(TRACE), "--mode", mode, "--start", "100",
                 "--max-requests", "8", "--time-compression", "4", "--output-tokens", "12",
                 "--nats-url", stack.nats_url, "--json", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    result = json.loads(out.read_text())
    assert (result["requests"], result["completed"], result["failed"]) == (8, 8, 0)
    assert 0 <= result["slo_attainment"] <= 1 and result["goodput_rps"] >= 0
    for metric in ("ttft_ms", "tpot_ms"):
        assert set(result[metric]) >= {"p50", "p90", "p99"}
        assert 0 < result[metric]["p50"] <= result[metric]["p90"] <= result[metric]["p99"]
    # The client's timestamps and the server's own timings agree: the client adds only the
    # hop to the edge and the stream back.
    agreement = result["agreement"]
    assert agreement["ttft_ms"]["n"] == 8 and agreement["ttft_ms"]["max"] < 100, agreement
    assert agreement["tpot_ms"]["n"] == 8 and agreement["tpot_ms"]["max"] < 20, agreement
    # Rows 100-107 ask for contexts of up to 8k tokens: 6 of them are over the tiny target's
    # 1,024-token prompt limit and capped (the result says so).
    assert result["capped_in_workload"] == 6
    assert "| " in capsys.readouterr().out  # the Markdown summary was printed
    for name in ("cdf.png", "over_time.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_stack_or_trace_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["replay", "--trace", str(tmp_path / "nope.csv"), "--mode", "sled",
                 "--nats-url", "nats://127.0.0.1:1"]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["replay", "--trace", str(TRACE), "--mode", "sled",
                 "--state-dir", str(tmp_path)]) == 2
    assert "no running stack" in capsys.readouterr().err


def test_capacity_probes_the_running_stack_and_writes_its_report(stack, tmp_path) -> None:
    """The search end to end at a tiny scale (the full run is docs/benchmarks.md's)."""
    out = tmp_path / "cap"
    assert main(["capacity", "--trace", str(TRACE), "--start", "100", "--max-requests", "4",
                 "--output-tokens", "8", "--modes", "sled", "--repeats", "1", "--steps", "0",
                 "--max-load", "2", "--nats-url", stack.nats_url, "--out-dir", str(out)]) == 0
    result = json.loads((out / "capacity.json").read_text())
    probes = result["modes"]["sled"]["probes"]
    assert [p["load"] for p in probes] == [1.0, 2.0] and all(p["passed"] for p in probes)
    assert result["capacity_rps"]["sled"] == probes[-1]["offered_rps"]
    for name in ("vs_load.png", "cdf_at_capacity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "never failed" in (out / "capacity.md").read_text()


def test_a_sweep_measures_every_point_and_writes_its_report(stack, tmp_path) -> None:
    """Two rates and one concurrency, one mode, 4 requests each (the full run is the
    operator's): every point has §7's metrics and the edges' verdict, the table a row each."""
    common = ["--trace", str(TRACE), "--start", "100", "--max-requests", "4",
              "--output-tokens", "8", "--modes", "sled", "--nats-url", stack.nats_url, "--quiet"]
    out = tmp_path / "rates"
    assert main(["sweep", *common, "--rates", "1,2", "--out-dir", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["axis"] == "rate_scale" and result["broken_modes"] == []
    points = result["points"]
    assert [(p["mode"], p["rate_scale"]) for p in points] == [("sled", 1.0), ("sled", 2.0)]
    for p in points:
        assert (p["requests"], p["completed"], p["failed"], p["stopped_early"]) == (4, 4, 0, None)
        assert 0 <= p["slo_attainment"] <= 1 and p["goodput_rps"] >= 0 and p["offered_rps"] > 0
        for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert 0 < p[metric]["p50"] <= p[metric]["p90"] <= p[metric]["p99"]
        assert "edges_valid" in p and p["edges_behind"]["rounds"] == 0  # fleet none: unjudged
    assert points[1]["offered_rps"] == pytest.approx(2 * points[0]["offered_rps"], rel=1e-3)
    rows = [line for line in (out / "sweep.md").read_text().splitlines()
            if line.startswith("| sled |")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2"]
    for name in ("vs_load.png", "cdf.png", "over_time_sled.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    closed = tmp_path / "closed"
    assert main(["sweep", *common, "--concurrency", "2", "--out-dir", str(closed)]) == 0
    (point,) = json.loads((closed / "sweep.json").read_text())["points"]
    assert (point["concurrency"], point["completed"], point["offered_rps"]) == (2, 4, None)
    assert "| sled | 2 |" in (closed / "sweep.md").read_text()
