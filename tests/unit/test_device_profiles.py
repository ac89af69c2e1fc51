"""Device profiles without NATS: the shipped presets, profile files (and their errors), the
emulated connectivity gaps, and the edge's emulation hook."""

import dataclasses

import pytest

from common.errors import ErrorCode, WispError
from services.edge_drafter.device_profile import GapSchedule, LinkEmulator, emulate
from services.edge_drafter.profiles import (
    PRESETS_FILE,
    PROFILES,
    DeviceProfile,
    get_profile,
    load_profiles,
)
from services.edge_drafter.service import EdgeConfig

# The presets as they were written in code before they moved to profiles.toml, plus the gaps
# phone-lte gained: (draft ms/token, RTT ms, jitter ms, up kbps, down kbps, gap every s, gap s).
PRESETS = {
    "none": (0, 0, 0, 0, 0, 0, 0),
    "lan": (0, 2.0, 0.5, 0, 0, 0, 0),
    "wifi": (0, 20.0, 5.0, 50_000, 100_000, 0, 0),
    "4g": (0, 60.0, 15.0, 10_000, 30_000, 0, 0),
    "slow-phone-4g": (25.0, 60.0, 15.0, 10_000, 30_000, 0, 0),
    "jetson-wifi": (8.0, 20.0, 5.0, 50_000, 100_000, 0, 0),
    "phone-lte": (25.0, 60.0, 15.0, 10_000, 30_000, 120.0, 2.0),
    "edge-server-wired": (3.0, 2.0, 0.5, 0, 0, 0, 0),
}


def numbers(p: DeviceProfile) -> tuple:
    return dataclasses.astuple(p)[1:]


def write(tmp_path, text: str):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


# -- presets and files ------------------------------------------------------------------------
def test_the_presets_come_from_the_shipped_file_with_their_numbers():
    assert PRESETS_FILE.name == "profiles.toml" and PRESETS_FILE.is_file()
    assert {name: numbers(p) for name, p in PROFILES.items()} == PRESETS
    assert all(p.name == name for name, p in PROFILES.items())
    assert [n for n, p in PROFILES.items() if p.has_gaps] == ["phone-lte"]
    assert load_profiles() == PROFILES and load_profiles("") == PROFILES


def test_a_user_file_adds_profiles_to_the_presets(tmp_path):
    path = write(tmp_path, '[profiles.lab-phone]\ndraft_ms_per_token = 40\nrtt_ms = 90.5\n'
                           'gap_every_s = 60\ngap_s = 3\n'
                           # a loadgen fleets file: its fleets are loadgen's business
                           '[fleets.lab]\nprofiles = { "lab-phone" = 1 }\n')
    profiles = load_profiles(path)
    assert set(profiles) == set(PROFILES) | {"lab-phone"}
    lab = profiles["lab-phone"]
    assert (lab.draft_ms_per_token, lab.rtt_ms, lab.gap_every_s, lab.gap_s) == (40, 90.5, 60, 3)
    assert lab.jitter_ms == 0.0 and lab.has_gaps
    assert get_profile("lab-phone", profiles) is lab
    with pytest.raises(ValueError, match="unknown device profile 'lab-phone'"):
        get_profile("lab-phone")  # the presets alone do not know it


@pytest.mark.parametrize(("text", "match"), [
    ('[profiles.bad\n', "not valid TOML"),
    ('[profile.bad]\nrtt_ms = 1\n', r"unknown key\(s\) \['profile'\]"),
    ('gaps_emulated = false\n', r"unknown key\(s\) \['gaps_emulated'\]"),
    ('profiles = 3\n', "'profiles' must be a table"),
    ('[profiles]\nbad = 3\n', "'bad' must be a table of numbers"),
    ('[profiles.bad]\nrtt = 1\n', r"'bad': unknown key\(s\) \['rtt'\]"),
    ('[profiles.bad]\nrtt_ms = -1\n', "'bad': rtt_ms must be a finite number >= 0, got -1"),
    ('[profiles.bad]\njitter_ms = "5"\n', "'bad': jitter_ms must be a number, got '5'"),
    ('[profiles.bad]\nuplink_kbps = true\n', "'bad': uplink_kbps must be a number"),
    ('[profiles.bad]\ndownlink_kbps = nan\n', "'bad': downlink_kbps must be a finite"),
    ('[profiles.bad]\ngap_every_s = inf\ngap_s = 1\n', "'bad': gap_every_s must be a finite"),
    ('[profiles.bad]\ngap_every_s = 60\n', "'bad': gap_every_s and gap_s go together"),
    ('[profiles."a b"]\nrtt_ms = 1\n', "'a b': not a valid name"),
    ('[profiles.phone-lte]\nrtt_ms = 1\n', "'phone-lte' is a preset"),
])
def test_a_bad_profile_file_is_a_clear_error(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=match) as info:
        load_profiles(path)
    assert str(path) in str(info.value)


def test_a_missing_profile_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_profiles(tmp_path / "nowhere.toml")


# -- connectivity gaps ------------------------------------------------------------------------
def test_gaps_repeat_with_the_seed_and_have_the_profile_s_mean():
    a, b, c = GapSchedule(10.0, 1.0, seed=5), GapSchedule(10.0, 1.0, seed=5), \
        GapSchedule(10.0, 1.0, seed=6)
    gaps = a.gaps(100_000.0)
    assert gaps == b.gaps(100_000.0) and gaps != c.gaps(100_000.0)
    assert all(end - start == pytest.approx(1.0) for start, end in gaps)
    ups = [s2 - e1 for (_, e1), (s2, _) in zip(gaps, gaps[1:], strict=False)]
    assert min(ups) > 0  # never overlapping
    # ~9k exponential draws of mean 10 s: the sample mean is within 3 % of it.
    assert sum(ups) / len(ups) == pytest.approx(10.0, rel=0.03)


def test_a_message_sent_in_a_gap_waits_for_its_end():
    p = DeviceProfile("t", rtt_ms=40.0, gap_every_s=30.0, gap_s=2.0)
    link = LinkEmulator(p, seed=3, clock=lambda: pytest.fail("times are passed explicitly"))
    start, end = GapSchedule(30.0, 2.0, seed=3).gaps(1e6)[0]
    t0 = 1000.0  # the loop's time when the session's first message goes out
    assert link.uplink_delay_s(0, now=t0) == pytest.approx(0.020)  # the link is up at first
    assert link.uplink_delay_s(0, now=t0 + start - 0.001) == pytest.approx(0.020)
    # Sent 0.5 s into the gap: held 1.5 s, then the usual 20 ms one way.
    assert link.uplink_delay_s(0, now=t0 + start + 0.5) == pytest.approx(1.520)
    assert link.downlink_delay_s(0, now=t0 + start + 1.9) == pytest.approx(0.120)
    assert link.gap_hold_s(now=t0 + end + 1e-6) == 0.0
    # Out of order (a test's explicit times) the schedule still answers from its draw.
    assert link.gap_hold_s(now=t0 + start + 1e-6) == pytest.approx(2.0, abs=1e-5)


def test_the_gaps_clock_starts_at_the_first_message_on_the_given_clock():
    p = DeviceProfile("t", gap_every_s=30.0, gap_s=2.0)
    start, _ = GapSchedule(30.0, 2.0, seed=9).gaps(1e6)[0]
    now = [50.0]
    link = LinkEmulator(p, seed=9, clock=lambda: now[0])
    assert link.gap_hold_s() == 0.0
    now[0] = 50.0 + start + 0.25
    assert link.uplink_delay_s(0) == pytest.approx(1.75)


def test_gaps_leave_the_jitter_draws_alone():
    plain = DeviceProfile("t", rtt_ms=40.0, jitter_ms=6.0)
    gappy = dataclasses.replace(plain, gap_every_s=1e9, gap_s=1.0)  # a gap far in the future
    a, b = LinkEmulator(plain, seed=7), LinkEmulator(gappy, seed=7, clock=lambda: 0.0)
    assert [a.uplink_delay_s(100) for _ in range(20)] == \
        [b.uplink_delay_s(100) for _ in range(20)]


def test_a_profile_without_gaps_never_holds_nor_reads_the_clock():
    link = LinkEmulator(PROFILES["jetson-wifi"], seed=1, clock=lambda: pytest.fail("clock"))
    assert link.gap_hold_s() == 0.0
    with pytest.raises(ValueError):
        GapSchedule(0.0, 1.0, seed=1)


# -- the edge's hook --------------------------------------------------------------------------
class Port:
    link = None


def test_the_hook_knows_a_file_s_profiles_and_refuses_unknown_ones(tmp_path):
    profiles = load_profiles(write(tmp_path, "[profiles.lab-phone]\nrtt_ms = 90\n"))
    wrap = emulate(None, profiles)
    verifier, drafter = wrap("lab-phone", "ab" * 16, Port(), None)
    assert verifier.link.profile is profiles["lab-phone"] and drafter is None
    assert wrap(None, "ab" * 16, Port(), None)[0].link is None  # no default: no emulation
    with pytest.raises(WispError) as info:
        wrap("carrier-pigeon", "ab" * 16, Port(), None)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert "lab-phone" in info.value.message and "phone-lte" in info.value.message
    with pytest.raises(WispError, match="known"):
        emulate(None)("lab-phone", "ab" * 16, Port(), None)  # presets only


def test_the_edge_config_checks_its_profiles_file_at_start(tmp_path):
    good = write(tmp_path, "[profiles.lab]\nrtt_ms = 1\n")
    assert EdgeConfig(device_profiles=str(good), device_profile="lab").device_profile == "lab"
    with pytest.raises(ValueError, match="unknown device profile 'lab'"):
        EdgeConfig(device_profile="lab")  # the presets alone do not know it
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.x]\nrtt_ms = -1\n")
    with pytest.raises(ValueError, match=r"bad\.toml: device profile 'x': rtt_ms"):
        EdgeConfig(device_profiles=str(bad))
