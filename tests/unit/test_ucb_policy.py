"""UcbSpecStop on a simulated device: i.i.d. acceptance, fixed draft/verify times, an RTT.

A round of k drafted tokens commits (leading accepted + 1) tokens in k * T_DRAFT + RTT + T_VERIFY
seconds; the analytic best k maximizes E[committed] / that time, with
E[committed] = (1 - ALPHA^(k+1)) / (1 - ALPHA). At these numbers it is 3 for a 2 ms RTT and 8 for
200 ms (among the default arms), and a policy drafting any one fixed length fails these tests.
"""

import random

import pytest
import torch

from common.engine.policies import DraftStep, PolicySession, RoundFeedback
from common.engine.ucb import DEFAULT_ARMS, UcbSpecStop

ALPHA = 0.75  # per-token acceptance probability
T_DRAFT = 0.004  # s per drafted token
T_VERIFY = 0.015  # s per verification on the server
LOW_RTT, HIGH_RTT = 0.002, 0.2  # s
ROUNDS = 400
SEEDS = (0, 1)


def throughput(k: int, rtt: float) -> float:
    """Expected committed tokens per second when always drafting k."""
    return (1 - ALPHA ** (k + 1)) / (1 - ALPHA) / (k * T_DRAFT + rtt + T_VERIFY)


def best_arm(rtt: float, arms=DEFAULT_ARMS) -> int:
    return max(arms, key=lambda k: throughput(k, rtt))


def play(policy: UcbSpecStop, sid: str, rtt: float, rounds: int, rng: random.Random) -> list[int]:
    """Runs `rounds` simulated rounds of session `sid`; the draft length of each."""
    lengths = []
    for _ in range(rounds):
        (k,) = policy.round_limits([sid])
        accepted = 0
        while accepted < k and rng.random() < ALPHA:
            accepted += 1
        policy.observe(RoundFeedback(sid=sid, num_drafted=k, num_accepted=accepted,
                                     features=torch.zeros(k, 7), draft_time_s=k * T_DRAFT,
                                     round_trip_s=rtt + T_VERIFY))
        lengths.append(k)
    return lengths


def session(policy: UcbSpecStop, sid: str, device: str, k_max: int = 16) -> None:
    policy.open(PolicySession(sid=sid, device_id=device, k_max=k_max))


def mean(xs) -> float:
    return sum(xs) / len(xs)


def test_analytic_optimum_grows_with_rtt():
    assert best_arm(LOW_RTT) == 3
    assert best_arm(HIGH_RTT) == 8


@pytest.mark.parametrize("seed", SEEDS)
def test_settles_near_optimum_and_longer_for_high_rtt(seed):
    settled, recent = {}, {}
    for rtt in (LOW_RTT, HIGH_RTT):
        policy = UcbSpecStop(seed=seed)
        session(policy, "s", "dev")
        lengths = play(policy, "s", rtt, ROUNDS, random.Random(seed + 100))
        settled[rtt], recent[rtt] = policy.preferred_length("dev"), lengths[-100:]
        optimum = throughput(best_arm(rtt), rtt)
        assert throughput(settled[rtt], rtt) >= 0.85 * optimum, (rtt, settled[rtt])
        assert mean([throughput(k, rtt) for k in recent[rtt]]) >= 0.85 * optimum, rtt
    assert settled[HIGH_RTT] > settled[LOW_RTT]
    assert mean(recent[HIGH_RTT]) > mean(recent[LOW_RTT])


@pytest.mark.parametrize("seed", SEEDS)
def test_tracks_a_jump_in_rtt(seed):
    policy = UcbSpecStop(seed=seed)
    session(policy, "s", "dev")
    rng = random.Random(seed + 200)
    before = play(policy, "s", LOW_RTT, ROUNDS, rng)[-100:]
    assert throughput(policy.preferred_length("dev"), LOW_RTT) >= 0.85 * throughput(3, LOW_RTT)
    after = play(policy, "s", HIGH_RTT, ROUNDS, rng)
    low, high = mean(before), mean(after[-100:])
    assert high >= low + 2 or high > 1.5 * low, (low, high)
    # already within some tens of rounds (at least 1.56 longer over seeds 0-39)
    assert mean(after[50:150]) >= low + 1.5, (low, mean(after[50:150]))
    assert throughput(policy.preferred_length("dev"), HIGH_RTT) >= 0.85 * throughput(8, HIGH_RTT)


@pytest.mark.parametrize("seed", SEEDS)
def test_devices_learn_separately_in_one_policy(seed):
    policy = UcbSpecStop(seed=seed)
    session(policy, "a", "near")
    session(policy, "b", "far")
    rng_a, rng_b = random.Random(seed + 300), random.Random(seed + 400)
    for _ in range(ROUNDS):
        play(policy, "a", LOW_RTT, 1, rng_a)
        play(policy, "b", HIGH_RTT, 1, rng_b)
    near, far = policy.preferred_length("near"), policy.preferred_length("far")
    assert far > near, (near, far)
    # closing a session keeps what its device learned; a later session starts from it
    policy.close("b")
    assert "b" not in policy.playing and policy.preferred_length("far") == far
    session(policy, "c", "far")
    assert mean(play(policy, "c", HIGH_RTT, 20, rng_b)) > near  # no fresh exploration sweep


def test_same_seed_same_lengths_and_k_max_respected():
    def lengths(seed: int, k_max: int = 16) -> list[int]:
        policy = UcbSpecStop(seed=seed)
        session(policy, "s", "dev", k_max)
        return play(policy, "s", HIGH_RTT, 300, random.Random(7))

    assert lengths(3) == lengths(3)
    capped = lengths(3, k_max=3)
    assert max(capped) == 3 and set(capped) <= {1, 2, 3}
    assert mean(capped[-100:]) > 2.5  # the longest allowed is the best here

    policy = UcbSpecStop(arms=(4, 8))
    session(policy, "small", "dev", k_max=2)
    assert policy.round_limits(["small"]) == [2]  # no arm fits: the session's k_max


def test_feedback_without_round_trip_or_arm_is_ignored_and_no_token_ends_a_round():
    policy = UcbSpecStop()
    session(policy, "s", "dev")
    (k,) = policy.round_limits(["s"])
    policy.observe(RoundFeedback("s", k, 0, torch.zeros(k, 7), 0.01, None))
    assert policy.preferred_length("dev") is None
    policy.observe(RoundFeedback("s", k, 0, torch.zeros(k, 7), 0.01, 0.02))  # no arm pending
    assert policy.preferred_length("dev") is None
    step = DraftStep(["s"], torch.tensor([0]), torch.zeros(1, 7))
    assert policy.last(step).tolist() == [False]


def test_from_arg():
    default = UcbSpecStop.from_arg("")
    assert (default.arms, default.gamma, default.c, default.seed) == (DEFAULT_ARMS, 0.995, 0.3, 0)
    policy = UcbSpecStop.from_arg("gamma=0.95,seed=3")
    assert (policy.gamma, policy.seed, policy.arms) == (0.95, 3, DEFAULT_ARMS)
    policy = UcbSpecStop.from_arg("arms=8/1/4/2, c=0.5")
    assert (policy.arms, policy.c) == ((1, 2, 4, 8), 0.5)
    assert UcbSpecStop.name == "ucb"


@pytest.mark.parametrize("arg, part", [
    ("gamma", "gamma"), ("k=3", "k=3"), ("gamma=fast", "gamma=fast"), ("arms=1/x", "arms=1/x"),
    ("seed=1.5", "seed=1.5"), ("gamma=1.5", "gamma"), ("arms=0/2", "arms"), ("c=-1", "c"),
])
def test_from_arg_rejects_bad_args(arg, part):
    with pytest.raises(ValueError, match=part.replace(".", r"\.")):
        UcbSpecStop.from_arg(arg)
