"""Capacity search logic on synthetic attainment curves (no stack)."""

from __future__ import annotations

import pytest

from loadgen.capacity import Probe, ratios, search


def curve(knee: float, repeats: int = 2):
    """A probe whose attainment is 100 % up to `knee` and falls linearly to 0 at 2 × knee."""
    calls: list[float] = []

    def probe(load: float) -> Probe:
        calls.append(load)
        att = 1.0 if load <= knee else max(0.0, 1.0 - (load - knee) / knee)
        return Probe(load, [att] * repeats, [load * att] * repeats, offered_rps=load * 10)

    return probe, calls


@pytest.mark.parametrize("knee", [0.3, 1.0, 3.3, 20.0])
def test_the_bracket_holds_the_90_percent_load(knee: float) -> None:
    probe, calls = curve(knee)
    found = search(probe, steps=4)
    true = knee * 1.1  # attainment(load) = 0.9 there
    assert found.passed.load <= true < found.failed.load
    assert found.failed.load / found.passed.load <= 2 ** (1 / 16) + 1e-9  # 4 bisections of ×2
    assert len(calls) == len(found.probes) <= 12
    result = found.as_dict(base_rps=10.0)
    assert result["capacity_rps"] == pytest.approx(found.passed.load * 10)
    assert [p["load"] for p in result["probes"]] == sorted(calls)


def test_never_failing_or_never_passing_is_said_not_guessed() -> None:
    probe, _ = curve(1000.0)
    found = search(probe, max_load=8.0)
    assert found.failed is None and found.passed.load == 8.0
    assert found.as_dict(None)["first_failing_load"] is None
    probe, _ = curve(1e-6)
    found = search(probe, min_load=0.25)
    assert found.passed is None and found.failed.load == 0.25
    assert found.as_dict(None)["capacity_rps"] is None


def test_repeats_average_and_their_spread_is_the_error_bar() -> None:
    p = Probe(2.0, [0.8, 1.0], [1.0, 3.0], offered_rps=5.0)
    assert p.attainment == pytest.approx(0.9) and p.passed
    point = p.point("wisp")
    assert point["load"] == 5.0 and point["err"] == {"slo_attainment": pytest.approx(0.1),
                                                     "goodput_rps": 1.0}


def test_ratios_between_modes() -> None:
    out = ratios({"wisp": 4.0, "sled": 2.0, "centralized": None}, ("centralized", "sled"))
    assert out["wisp"] == {"vs_centralized": None, "vs_sled": 2.0}
    assert out["sled"] == {"vs_centralized": None}


def test_validity_is_judged_at_the_bracket_not_at_overloaded_probes() -> None:
    """Edges falling behind far above capacity is expected; at the first failing probe it
    means the host may have failed, not the server: the capacity is then a lower bound. A pass
    with edges behind stands (harder conditions than the profile's)."""
    def edges(share: float) -> dict:
        return {"valid": share <= 0.05, "share_behind": share, "rounds": 100}

    def probe(behind_from: float, knee: float = 2.0):
        def run(load: float) -> Probe:
            att = 1.0 if load <= knee else 0.5
            return Probe(load, [att], [load], edges=edges(0.5 if load >= behind_from else 0.0))
        return run

    ok = search(probe(behind_from=8.0), steps=0)  # probes 1, 2, 4 (fails); 8 never probed
    assert (ok.passed.load, ok.failed.load) == (2.0, 4.0)
    assert ok.as_dict(None)["bound"] == "bracket" and ok.as_dict(None)["valid"] is True
    lower = search(probe(behind_from=4.0), steps=0).as_dict(None)  # the failure fell behind
    assert lower["bound"] == "lower" and lower["valid"] is True
    assert [p["edges_kept_up"] for p in lower["probes"]] == [True, True, False]
    behind_at_pass = search(probe(behind_from=2.0), steps=0).as_dict(None)
    assert behind_at_pass["bound"] == "lower"
    assert behind_at_pass["edges_kept_up_at_capacity"] is False
    never_passed = search(probe(behind_from=0.0, knee=0.0), steps=0, min_load=0.5).as_dict(None)
    assert never_passed["capacity_rps"] is None and never_passed["valid"] is False
    assert Probe(1.0, [1.0], [1.0]).edges_kept_up  # not judged: nothing to fall behind
