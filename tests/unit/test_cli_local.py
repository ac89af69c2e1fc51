"""`wisp generate --local --json`: every policy and mode reports the same accounting (drafted,
accepted, rounds, wasted_draft_ms) and the same greedy tokens; a mode that is not served is an
error that lists the ones that are."""

from __future__ import annotations

import json

import pytest

from services.cli import main

PROMPT = "def add(a, b):"


def generate(capsys, *flags: str) -> dict:
    assert main(["generate", "--local", "--json", "--max-new-tokens", "24", PROMPT,
                 *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def reference():
    from common.models.reference import hf_greedy
    from tests.shipped import shipped_pair

    _, target = shipped_pair()
    ids = target.tokenizer.encode(PROMPT, add_special_tokens=False)
    return hf_greedy(target.model, ids, 24, target.eos_token_id)


@pytest.mark.parametrize("flags, policy", [
    (("--policy", "predictor"), "predictor"),
    (("--mode", "wisp"), "predictor"),
    (("--mode", "ucb"), "ucb"),
    (("--policy", "confidence:0.1"), "confidence:0.1"),
    (("--policy", "fixed:3"), "fixed:3"),
    ((), "fixed"),
])
def test_every_policy_reports_the_accounting_and_greedy_tokens(capsys, reference, flags, policy):
    out = generate(capsys, *flags)
    stats = out["stats"]
    assert stats["policy"] == policy
    for key in ("drafted", "accepted", "rounds", "wasted_draft_ms", "wasted"):
        assert key in stats, key
    assert stats["wasted"] == stats["drafted"] - stats["accepted"]
    assert stats["rounds"] >= 1 and stats["wasted_draft_ms"] >= 0
    assert out["token_ids"] == reference
    if policy == "predictor":
        assert stats["predictor_version"] and stats["predictor_latency_us"]["calls"] > 0


def test_a_mode_that_is_not_served_lists_the_served_ones(capsys):
    assert main(["generate", "--local", "--mode", "turbo", PROMPT]) == 1
    err = capsys.readouterr().err
    assert "'turbo'" in err and "'wisp'" in err and "'ucb'" in err and "'sled'" in err


def test_a_missing_predictor_falls_back_to_fixed_k(capsys, reference, tmp_path):
    out = generate(capsys, "--mode", "wisp", "--predictor", str(tmp_path / "none.onnx"))
    assert out["token_ids"] == reference
    assert "predictor_version" not in out["stats"]
