"""VerifierCore: state-dependent refusals, batch isolation, idempotent rounds, capacity, the KV
invariant. (Shape and model-limit checks of requests happen before the core: test_protocol,
test_limits.)"""

import pytest
import torch

from common.engine.verifier import Verified, VerifierCore
from common.errors import ErrorCode, WispError
from common.models.paged_runner import PagedRunner
from common.protocol import SamplingParams, SessionSpec, VerifyRequest
from tests.unit.tiny_random_models import tiny_llama

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_core(model, num_blocks=256):
    return VerifierCore(PagedRunner(model, num_blocks=num_blocks, block_size=4), eos_token_id=None)


def spec(sid, max_new_tokens=8, **kw) -> SessionSpec:
    return SessionSpec(sid=sid, mode="sled", max_new_tokens=max_new_tokens, **kw)


def req(sid, round, base_len, draft, sparse_ids=None, sparse_probs=None) -> VerifyRequest:
    return VerifyRequest(sid=sid, round=round, base_len=base_len, draft_ids=draft,
                         budget_ms=100.0, draft_ms=0.0, device_id="d",
                         draft_sparse_ids=sparse_ids, draft_sparse_probs=sparse_probs)


def one(core, request) -> Verified | WispError:
    (out,) = core.verify_batch([request])
    return out


def greedy_next(model, ids):
    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_round_commits_target_greedy_tokens(model):
    core = make_core(model)
    prompt = [5, 9, 11, 3]
    core.open_session(spec("a", 10), prompt)
    first = greedy_next(model, prompt)
    # Draft the target's own token, then a wrong one: 1 accepted + the correction.
    wrong = (greedy_next(model, prompt + [first]) + 1) % VOCAB
    out = one(core, req("a", 0, len(prompt), [first, wrong, 7]))
    assert out.result.num_accepted == 1
    assert out.result.new_tokens == [first, greedy_next(model, prompt + [first])]
    assert core.committed("a") == prompt + out.result.new_tokens
    assert out.num_fed == len(prompt) + 3 and out.num_cached == 0
    # Next round is warm: only the last committed token plus the draft is fed.
    out2 = one(core, req("a", 1, out.result.committed_len, []))
    assert out2.num_cached == out.result.committed_len - 1 and out2.num_fed == 1
    assert out2.result.new_tokens == [greedy_next(model, core.committed("a")[:-1])]


def test_state_errors_are_per_item_and_the_rest_of_the_batch_proceeds(model):
    core = make_core(model)
    for sid in ("good", "base", "twice"):
        core.open_session(spec(sid), [1, 2, 3])
    alone = make_core(model)
    alone.open_session(spec("good"), [1, 2, 3])
    expected = one(alone, req("good", 0, 3, [4, 4]))

    results = core.verify_batch([
        req("good", 0, 3, [4, 4]),
        req("base", 0, 7, [1]),
        req("ghost", 0, 3, [1]),
        req("twice", 0, 3, [1]),
        req("twice", 0, 3, [2]),
    ])
    codes = [r.code if isinstance(r, WispError) else None for r in results]
    assert codes == [None, ErrorCode.BASE_MISMATCH, ErrorCode.UNKNOWN_SESSION, None,
                     ErrorCode.BAD_REQUEST]
    assert results[0].result.new_tokens == expected.result.new_tokens
    # A refused round leaves its session untouched and usable.
    ok = one(core, req("base", 0, 3, [4]))
    assert isinstance(ok, Verified)


def test_same_round_twice_returns_the_same_result_and_applies_once(model):
    core = make_core(model)
    core.open_session(spec("s"), [8, 9])
    first = one(core, req("s", 0, 2, [1, 2]))
    again = one(core, req("s", 0, 2, [1, 2]))
    assert again.result == first.result and again.replayed and again.num_fed == 0
    assert len(core.committed("s")) == first.result.committed_len
    nxt = one(core, req("s", 1, first.result.committed_len, []))
    old = one(core, req("s", 0, 2, [1, 2]))
    assert isinstance(nxt, Verified)
    assert isinstance(old, WispError) and old.code == ErrorCode.STALE_ROUND


def test_max_new_tokens_cuts_the_round_and_finishes(model):
    core = make_core(model)
    core.open_session(spec("s", 2), [3, 4])
    t1 = greedy_next(model, [3, 4])
    t2 = greedy_next(model, [3, 4, t1])
    t3 = greedy_next(model, [3, 4, t1, t2])
    out = one(core, req("s", 0, 2, [t1, t2, t3]))  # all three accepted, cut to two
    assert out.result.new_tokens == [t1, t2] and out.result.finished
    # The KV invariant holds even when the round was cut: never the last committed token.
    assert core.runner.cached_len("s") <= len(core.committed("s")) - 1
    after = one(core, req("s", 1, 4, []))
    assert isinstance(after, WispError) and after.code == ErrorCode.SESSION_FINISHED


def test_batch_too_big_for_kv_is_split_not_failed(model):
    # 8 blocks of 4 tokens: each 10-token request fits alone (3 blocks + draft), not all three.
    core = make_core(model, num_blocks=8)
    ref = make_core(model)
    prompts = {f"s{i}": [i + 1] * 10 for i in range(3)}
    for sid, p in prompts.items():
        core.open_session(spec(sid, 4), p)
        ref.open_session(spec(sid, 4), p)
    requests = [req(sid, 0, 10, [2]) for sid in prompts]
    got = core.verify_batch(requests)
    want = [one(ref, r) for r in requests]
    assert [g.result.new_tokens for g in got] == [w.result.new_tokens for w in want]


def test_sampling_round_uses_the_sparse_distribution(model):
    core = make_core(model)
    core.open_session(spec("s", sampling=SamplingParams(temperature=1.0), seed=1), [1, 2])
    ok = one(core, req("s", 0, 2, [4], [[4, 5]], [[0.75, 0.25]]))
    assert isinstance(ok, Verified) and 1 <= len(ok.result.new_tokens) <= 2
    assert not ok.greedy
    # A sampling round with nothing drafted: the target samples alone.
    base = ok.result.committed_len
    alone = one(core, req("s", 1, base, []))
    assert isinstance(alone, Verified) and len(alone.result.new_tokens) == 1


def test_a_failure_in_one_items_acceptance_fails_that_item_alone(model):
    """One request's numbers going bad (here: the target's logits for it are NaN) must not
    fail the others in its batch; its session is left as before the round."""
    core = make_core(model)
    for sid in ("bad", "good"):
        core.open_session(spec(sid, sampling=SamplingParams(temperature=0.7), seed=3), [1, 2, 3])
    real_forward = core.runner.forward

    def nan_for_bad(items):
        out = real_forward(items)
        return [torch.full_like(o, float("nan")) if it.seq_id == "bad" else o
                for it, o in zip(items, out, strict=True)]

    core.runner.forward = nan_for_bad
    bad, good = core.verify_batch([req("bad", 0, 3, []), req("good", 0, 3, [])])
    core.runner.forward = real_forward
    assert isinstance(bad, WispError) and bad.code == ErrorCode.INTERNAL
    assert isinstance(good, Verified)
    assert core.committed("bad") == [1, 2, 3] and core.runner.cached_len("bad") == 2
    again = one(core, req("bad", 0, 3, []))  # the session still works
    assert isinstance(again, Verified)


def test_a_rollback_that_keeps_too_much_kv_is_caught_not_repaired(model):
    """A verifier that truncates one token too few after a round breaks the KV invariant;
    the next round must fail loudly rather than silently re-feed."""
    core = make_core(model)
    core.open_session(spec("s"), [1, 2, 3])
    truncate = core.runner.truncate
    core.runner.truncate = lambda sid, n: truncate(sid, n + 1)  # the bug
    wrong = (greedy_next(model, [1, 2, 3]) + 1) % VOCAB
    out = one(core, req("s", 0, 3, [wrong, wrong]))  # rejected: KV must fall back to 3
    core.runner.truncate = truncate
    assert out.result.num_accepted == 0
    assert core.runner.cached_len("s") == len(core.committed("s"))
    with pytest.raises(AssertionError, match="KV invariant"):
        core.verify_batch([req("s", 1, out.result.committed_len, [])])
