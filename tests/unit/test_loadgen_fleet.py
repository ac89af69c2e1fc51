"""Emulated edge fleets and the CPU partition of the load generator: presets, fleet files,
seeded device assignment, CPU plans, pinning real processes, and the edges-behind check
(no NATS)."""

import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import msgspec
import pytest

from common.protocol import RoundEvent
from loadgen.fleet import Fleet, assign, describe, edge_env, known_profiles, load_fleets
from loadgen.partition import apply, edges_behind, pin_self, plan
from loadgen.workload import RequestSpec, synthetic
from services.edge_drafter.device_profile import PROFILES, get_profile, load_profiles

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                                reason="CPU affinity is Linux only")


# -- presets and fleet files ------------------------------------------------------------------
def test_presets_have_their_numbers_and_the_old_ones_stay():
    numbers = {name: (p.draft_ms_per_token, p.rtt_ms, p.jitter_ms, p.uplink_kbps,
                      p.downlink_kbps) for name, p in PROFILES.items()}
    assert numbers["jetson-wifi"] == (8.0, 20.0, 5.0, 50_000, 100_000)
    assert numbers["phone-lte"] == (25.0, 60.0, 15.0, 10_000, 30_000)
    assert numbers["edge-server-wired"] == (3.0, 2.0, 0.5, 0, 0)  # 0: unlimited
    assert numbers["slow-phone-4g"] == (25.0, 60.0, 15.0, 10_000, 30_000)
    assert {"none", "lan", "wifi", "4g"} <= set(PROFILES)
    assert get_profile("phone-lte") is PROFILES["phone-lte"]


def test_shipped_fleets_load_and_describe_themselves():
    fleets = load_fleets()
    assert {"mixed", "phones", "wired", "none"} <= set(fleets)
    mixed = fleets["mixed"]
    assert mixed.shares == pytest.approx(
        {"jetson-wifi": 0.4, "phone-lte": 0.4, "edge-server-wired": 0.2})
    d = describe(mixed)
    # Only the phones lose their link now and then; the report says which profiles do.
    assert d["gaps_emulated"] is True and d["profiles_with_gaps"] == ["phone-lte"]
    assert d["profiles"]["phone-lte"]["gap_every_s"] == 120.0
    assert d["profiles"]["jetson-wifi"]["gap_s"] == 0.0
    assert describe(fleets["wired"])["gaps_emulated"] is False
    assert d["profiles"]["phone-lte"]["draft_ms_per_token"] == 25.0
    assert d["profiles"]["edge-server-wired"]["share"] == pytest.approx(0.2)
    assert describe(fleets["none"])["profiles"]["none"]["draft_ms_per_token"] == 0.0


def test_a_user_file_adds_fleets(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[fleets.lab]\nprofiles = { "phone-lte" = 3, "lan" = 1 }\n')
    fleets = load_fleets(path)
    assert fleets["lab"].shares == {"phone-lte": 0.75, "lan": 0.25}
    assert "mixed" in fleets


@pytest.mark.parametrize(("text", "match"), [
    ('[fleets.bad]\nprofiles = { "carrier-pigeon" = 1 }\n', "'bad'.*carrier-pigeon.*known"),
    ('[fleets.bad]\nprofiles = { "phone-lte" = 0 }\n', "'bad'.*phone-lte.*> 0"),
    ('[fleets.bad]\nprofiles = { "phone-lte" = -1 }\n', "'bad'.*> 0"),
    ('[fleets.bad]\nprofiles = { "phone-lte" = true }\n', "'bad'.*> 0"),
    ('[fleets.bad]\nprofiles = {}\n', "'bad'.*no profiles"),
    ('[fleets.bad]\nprofile = { "phone-lte" = 1 }\n', "'bad'.*unknown key"),
    ('[fleets.mixed]\nprofiles = { "phone-lte" = 1 }\n', "'mixed' is a shipped fleet"),
    ('gaps_emulated = false\n', r"unknown key\(s\) \['gaps_emulated'\]"),
    ('[profiles.lab]\nrtt_ms = -5\n', "'lab': rtt_ms must be a finite number >= 0"),
    ('[profiles.lan]\nrtt_ms = 5\n', "'lan' is a preset"),
    ('[fleets.bad\n', "not valid TOML"),
])
def test_a_bad_fleet_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_fleets(path)
    assert str(path) in str(info.value)


LAB = ('[profiles.lab-phone]\ndraft_ms_per_token = 40.0\nrtt_ms = 90.0\n'
       'gap_every_s = 60.0\ngap_s = 3.0\n'
       '[fleets.lab]\ndescription = "phones of our lab"\n'
       'profiles = { "lab-phone" = 3, "phone-lte" = 1 }\n')


def test_a_fleet_file_s_own_profiles_are_drawn_described_and_edge_loadable(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(LAB)
    profiles = known_profiles(path)
    assert set(profiles) == set(PROFILES) | {"lab-phone"}
    fleets = load_fleets(path)
    lab = fleets["lab"]
    drawn = {s.device for s in assign(synthetic(200, 5.0, seed=1), lab, seed=2)}
    assert drawn == {"lab-phone", "phone-lte"}
    d = describe(lab, profiles=profiles)
    assert d["profiles"]["lab-phone"] | {"share": 0} == {
        "share": 0, "preset": False, "draft_ms_per_token": 40.0, "rtt_ms": 90.0,
        "jitter_ms": 0.0, "uplink_kbps": 0.0, "downlink_kbps": 0.0, "gap_every_s": 60.0,
        "gap_s": 3.0}
    assert d["profiles"]["phone-lte"]["preset"] is True
    assert d["profiles_with_gaps"] == ["lab-phone", "phone-lte"]
    with pytest.raises(ValueError, match="lab-phone"):
        describe(lab)  # the presets alone do not know it
    # The same file is the edge's: it loads there (fleets ignored) and edge_env names it.
    assert load_profiles(path) == profiles
    assert edge_env(path) == {"WISP_DEVICE_PROFILES": str(path.resolve())}
    assert edge_env(None) == {}


# -- assignment -------------------------------------------------------------------------------
def test_assign_is_seeded_and_keeps_named_devices():
    fleet = load_fleets()["mixed"]
    specs = synthetic(200, 5.0, seed=1)
    a, b = assign(specs, fleet, seed=3), assign(specs, fleet, seed=3)
    assert [s.device for s in a] == [s.device for s in b]
    assert [s.device for s in a] != [s.device for s in assign(specs, fleet, seed=4)]
    assert {s.device for s in a} == set(fleet.weights)
    assert [(s.index, s.arrival_s, s.prompt_tokens) for s in a] == \
        [(s.index, s.arrival_s, s.prompt_tokens) for s in specs]
    # A request that names a device keeps it, and the others' draws do not move.
    named = [RequestSpec(i, float(i), 8, 8, device="lan" if i % 3 == 0 else None)
             for i in range(200)]
    got = assign(named, fleet, seed=3)
    assert all(g.device == "lan" for g in got[::3])
    assert [g.device for i, g in enumerate(got) if i % 3] == \
        [s.device for i, s in enumerate(a) if i % 3]


def test_assign_matches_the_weights_over_many_requests():
    fleet = Fleet("t", {"jetson-wifi": 0.4, "phone-lte": 0.4, "edge-server-wired": 0.2})
    specs = [RequestSpec(i, 0.0, 1, 1) for i in range(10_000)]
    counts = Counter(s.device for s in assign(specs, fleet, seed=0))
    for name, share in fleet.shares.items():
        # Binomial sd at n=10k is at most 0.5 %; 2 % is four of them.
        assert counts[name] / 10_000 == pytest.approx(share, abs=0.02)


def test_a_fleet_refuses_bad_weights():
    with pytest.raises(ValueError, match="'f'.*finite"):
        Fleet("f", {"lan": float("nan")})
    with pytest.raises(ValueError, match="'f'.*no profiles"):
        Fleet("f", {})


# -- CPU partition ----------------------------------------------------------------------------
def test_plan_splits_cpus_disjointly():
    p = plan({0, 1})
    assert p.server == {0} and p.edges == {1} and not p.shared
    p = plan(set(range(8)), server_share=0.75)
    assert p.server == set(range(6)) and p.edges == {6, 7}
    p = plan(set(range(4)), server_share=0.01)  # at least one CPU a side
    assert len(p.server) == 1 and len(p.edges) == 3
    here = plan()  # this machine's CPUs (2 on the dev box)
    if len(here.server | here.edges) > 1:
        assert here.server and here.edges and not here.server & here.edges
        assert not here.shared
    with pytest.raises(ValueError):
        plan({0, 1}, server_share=1.0)
    with pytest.raises(ValueError):
        plan(set())


def test_plan_on_one_cpu_is_shared_and_says_why():
    p = plan({3})
    assert p.shared and p.server == p.edges == {3} and "one CPU" in p.reason
    assert p.to_dict()["shared"] is True


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "5"])


@linux_only
def test_apply_pins_live_processes_and_reports_dead_ones():
    part = plan()  # on one CPU a shared plan: both sides get it, pinning still works
    verifier, edge, dead = _sleeper(), _sleeper(), _sleeper()
    dead.kill()
    dead.wait()
    stack = SimpleNamespace(infra=None, services=[
        SimpleNamespace(name="gpu-verifier-0", module="services.gpu_verifier", proc=verifier),
        SimpleNamespace(name="edge-drafter-0", module="services.edge_drafter", proc=edge),
        SimpleNamespace(name="metrics", module="services.metrics", proc=dead),
        SimpleNamespace(name="predictor", module="services.predictor", proc=None),
    ])
    try:
        report = apply(stack, part)
        assert os.sched_getaffinity(verifier.pid) == part.server
        assert os.sched_getaffinity(edge.pid) == part.edges
        procs = report["processes"]
        assert procs["gpu-verifier-0"]["status"] == "pinned"
        assert procs["gpu-verifier-0"]["pid"] == verifier.pid
        assert procs["gpu-verifier-0"]["side"] == "server"
        assert procs["edge-drafter-0"]["side"] == "edges"
        assert procs["metrics"]["status"] == "gone" and procs["metrics"]["pid"] == dead.pid
        assert procs["predictor"]["status"] == "not started"
        assert report["complete"] is False
        assert report["server"] == sorted(part.server)
    finally:
        for p in (verifier, edge):
            p.kill()
            p.wait()


@linux_only
def test_apply_pins_the_embedded_servers_and_every_thread():
    part = plan()
    # A process with a second thread, started before the pinning: it must move too.
    code = ("import threading, time; threading.Thread(target=time.sleep, args=(5,)).start();"
            " print('up', flush=True); time.sleep(5)")
    nats = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    redis = _sleeper()
    try:
        assert nats.stdout.readline().strip() == "up"
        stack = SimpleNamespace(services=[], infra=SimpleNamespace(
            nats=SimpleNamespace(pid=nats.pid), redis=SimpleNamespace(pid=redis.pid)))
        report = apply(stack, part)
        assert report["complete"] and report["processes"]["nats-server"]["threads"] == 2
        for tid in os.listdir(f"/proc/{nats.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == part.server
        assert os.sched_getaffinity(redis.pid) == part.server
    finally:
        for p in (nats, redis):
            p.kill()
            p.wait()


@linux_only
def test_pin_self_goes_with_the_edges():
    before = os.sched_getaffinity(0)
    try:
        part = plan()
        report = pin_self(part)
        assert report["processes"]["loadgen"]["status"] == "pinned"
        assert os.sched_getaffinity(0) == part.edges
    finally:
        # pin_self moved every thread: give them all back to the rest of the session.
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), before)


# -- edges behind -----------------------------------------------------------------------------
def _round(sid: str, drafted: int, draft_ms: float, mode: str = "wisp") -> RoundEvent:
    return RoundEvent(ts_ms=0.0, sid=sid, mode=mode, round=0, drafted=drafted, accepted=0,
                      committed=1, draft_ms=draft_ms, wasted_draft_ms=0.0, rtt_ms=1.0,
                      budget_ms=100.0, batch_size=1)


def test_edges_behind_flags_profiles_whose_drafting_overran():
    sids = {"a" * 32: "phone-lte", "b" * 32: "edge-server-wired", "c" * 32: "none"}
    events = (
        # phones: 4 tokens at 25 ms = 100 ms; threshold 125 + 1 ms slack. 1 of 10 behind.
        [_round("a" * 32, 4, 100.5) for _ in range(9)] + [_round("a" * 32, 4, 140.0)]
        # wired: 2 tokens at 3 ms = 6 ms; threshold 8.5 ms. 2 of 4 behind.
        + [_round("b" * 32, 2, 6.2), _round("b" * 32, 2, 8.0), _round("b" * 32, 2, 9.0),
           _round("b" * 32, 2, 30.0)]
        # not judged: no emulated speed, nothing drafted, a session nobody mapped
        + [_round("c" * 32, 4, 500.0), _round("a" * 32, 0, 0.0, mode="centralized"),
           _round("d" * 32, 4, 500.0)])
    r = edges_behind(events, sids)
    assert r["rounds"] == 14 and r["behind"] == 3 and r["unjudged_rounds"] == 3
    assert r["by_profile"]["phone-lte"]["share_behind"] == pytest.approx(0.1)
    assert r["by_profile"]["edge-server-wired"]["share_behind"] == pytest.approx(0.5)
    assert r["by_profile"]["edge-server-wired"]["max_ratio"] == pytest.approx(5.0)
    assert r["valid"] is False
    assert r["worst"] == ["edge-server-wired", "phone-lte"]
    # A looser bar passes; JSON-form events (read back from a file) work the same.
    loose = edges_behind([msgspec.to_builtins(e) for e in events], sids, max_share=0.5)
    assert loose["valid"] is True and loose["behind"] == 3


def test_edges_behind_judges_a_fleet_file_s_own_profile(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(LAB)
    sids = {"a" * 32: "lab-phone"}
    # 40 ms per token: 3 tokens on time at 121 ms, 3 tokens behind at 200 ms.
    events = [_round("a" * 32, 3, 121.0), _round("a" * 32, 3, 200.0)]
    r = edges_behind(events, sids, profiles=known_profiles(path))
    assert r["rounds"] == 2 and r["behind"] == 1 and r["worst"] == ["lab-phone"]
    assert r["by_profile"]["lab-phone"]["max_ratio"] == pytest.approx(200 / 120)
    # Without the file's profiles its rounds cannot be judged (and are counted as such).
    assert edges_behind(events, sids)["unjudged_rounds"] == 2


def test_edges_behind_with_every_edge_on_time_is_valid():
    sids = {"a" * 32: "jetson-wifi"}
    r = edges_behind([_round("a" * 32, 5, 40.3) for _ in range(20)], sids)
    assert r["valid"] and r["behind"] == 0 and r["worst"] == []
    empty = edges_behind([], sids)
    assert empty["valid"] and empty["rounds"] == 0 and empty["share_behind"] == 0.0
    with pytest.raises(ValueError):
        edges_behind([], sids, tolerance=-0.1)


def test_colocated_rounds_draft_on_the_server_and_are_not_judged():
    """A colocated session names a device, but its drafts ran on the server: a slow server
    draft is not an edge falling behind."""
    sids = {"a" * 32: "jetson-wifi"}
    slow = [_round("a" * 32, 5, 400.0, mode="colocated") for _ in range(10)]
    r = edges_behind(slow, sids)
    assert r["valid"] and r["rounds"] == 0 and r["unjudged_rounds"] == 10
    assert not edges_behind([_round("a" * 32, 5, 400.0, mode="sled")] * 10, sids)["valid"]
