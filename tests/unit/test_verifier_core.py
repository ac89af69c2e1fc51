"""VerifierCore: batch isolation of bad input, idempotent rounds, capacity, sparse validation."""

import pytest
import torch

from common.errors import ErrorCode, WispError
from common.models.paged_runner import PagedRunner
from common.sampling import SamplingParams
from services.gpu_verifier.core import SessionSpec, VerifierCore, VerifyItem
from tests.unit.tiny_random_models import tiny_llama

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_core(model, num_blocks=256, k_max=4):
    runner = PagedRunner(model, num_blocks=num_blocks, block_size=4)
    return VerifierCore(runner, eos_token_id=None, k_max=k_max, max_prompt_tokens=40)


def greedy_next(model, ids):
    with torch.no_grad():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


def test_round_commits_target_greedy_tokens(model):
    core = make_core(model)
    prompt = [5, 9, 11, 3]
    core.open_session(SessionSpec("a", prompt, max_new_tokens=10))
    first = greedy_next(model, prompt)
    # Draft the target's own token, then a wrong one: 1 accepted + the correction.
    wrong = (greedy_next(model, prompt + [first]) + 1) % VOCAB
    (out,) = core.verify_batch([VerifyItem("a", 0, len(prompt), [first, wrong, 7])])
    assert out.num_accepted == 1
    assert out.new_tokens == [first, greedy_next(model, prompt + [first])]
    assert core.committed("a") == prompt + out.new_tokens
    assert out.num_input_tokens == len(prompt) + 3 and out.num_cached_tokens == 0
    # Next round is warm: only the last committed token plus the draft is fed.
    (out2,) = core.verify_batch([VerifyItem("a", 1, out.committed_len, [])])
    assert out2.num_cached_tokens == out.committed_len - 1 and out2.num_input_tokens == 1
    assert out2.new_tokens == [greedy_next(model, core.committed("a")[:-1])]


def test_bad_items_get_errors_and_the_rest_of_the_batch_proceeds(model):
    core = make_core(model)
    for sid in ("good", "oov", "long", "base"):
        core.open_session(SessionSpec(sid, [1, 2, 3], max_new_tokens=8))
    alone = make_core(model)
    alone.open_session(SessionSpec("good", [1, 2, 3], max_new_tokens=8))
    (expected,) = alone.verify_batch([VerifyItem("good", 0, 3, [4, 4])])

    results = core.verify_batch([
        VerifyItem("good", 0, 3, [4, 4]),
        VerifyItem("oov", 0, 3, [4, VOCAB + 5]),
        VerifyItem("long", 0, 3, [1] * 5),
        VerifyItem("base", 0, 7, [1]),
        VerifyItem("ghost", 0, 3, [1]),
    ])
    codes = [r.code if isinstance(r, WispError) else None for r in results]
    assert codes == [None, ErrorCode.OUT_OF_VOCABULARY, ErrorCode.DRAFT_TOO_LONG,
                     ErrorCode.BASE_MISMATCH, ErrorCode.UNKNOWN_SESSION]
    assert results[0].new_tokens == expected.new_tokens
    # A rejected round leaves its session untouched and usable.
    (ok,) = core.verify_batch([VerifyItem("oov", 0, 3, [4])])
    assert not isinstance(ok, WispError)


def test_same_round_twice_returns_the_same_result_and_applies_once(model):
    core = make_core(model)
    core.open_session(SessionSpec("s", [8, 9], max_new_tokens=8))
    (first,) = core.verify_batch([VerifyItem("s", 0, 2, [1, 2])])
    (again,) = core.verify_batch([VerifyItem("s", 0, 2, [1, 2])])
    assert again == first
    assert len(core.committed("s")) == first.committed_len
    (stale,) = core.verify_batch([VerifyItem("s", 1, first.committed_len, [])])
    (old,) = core.verify_batch([VerifyItem("s", 0, 2, [1, 2])])
    assert not isinstance(stale, WispError)
    assert isinstance(old, WispError) and old.code == ErrorCode.STALE_ROUND


def test_open_rejects_bad_prompts(model):
    core = make_core(model)
    with pytest.raises(WispError) as err:
        core.open_session(SessionSpec("x", list(range(41)), max_new_tokens=4))
    assert err.value.code == ErrorCode.PROMPT_TOO_LONG and "41 tokens" in err.value.message
    with pytest.raises(WispError) as err:
        core.open_session(SessionSpec("x", [1, VOCAB], max_new_tokens=4))
    assert err.value.code == ErrorCode.OUT_OF_VOCABULARY
    with pytest.raises(WispError) as err:
        core.open_session(SessionSpec("x", [], max_new_tokens=4))
    assert err.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(WispError) as err:
        core.open_session(SessionSpec("x", [1], max_new_tokens=10_000))
    assert err.value.code == ErrorCode.SEQUENCE_TOO_LONG


def test_max_new_tokens_cuts_the_round_and_finishes(model):
    core = make_core(model)
    core.open_session(SessionSpec("s", [3, 4], max_new_tokens=2))
    t1 = greedy_next(model, [3, 4])
    t2 = greedy_next(model, [3, 4, t1])
    (out,) = core.verify_batch([VerifyItem("s", 0, 2, [t1, t2])])
    assert out.new_tokens == [t1, t2] and out.finished
    (after,) = core.verify_batch([VerifyItem("s", 1, 4, [])])
    assert isinstance(after, WispError) and after.code == ErrorCode.SESSION_FINISHED


def test_batch_too_big_for_kv_is_split_not_failed(model):
    # 6 blocks of 4 tokens: each 10-token request fits alone (3 blocks + draft), not all three.
    core = make_core(model, num_blocks=8)
    ref = make_core(model)
    prompts = {f"s{i}": [i + 1] * 10 for i in range(3)}
    for sid, p in prompts.items():
        core.open_session(SessionSpec(sid, p, max_new_tokens=4))
        ref.open_session(SessionSpec(sid, p, max_new_tokens=4))
    items = [VerifyItem(sid, 0, 10, [2]) for sid in prompts]
    got = core.verify_batch(items)
    want = [ref.verify_batch([it])[0] for it in items]
    assert [g.new_tokens for g in got] == [w.new_tokens for w in want]


def test_sampling_rounds_validate_the_sparse_distribution(model):
    core = make_core(model)
    core.open_session(SessionSpec("s", [1, 2], 8, SamplingParams(temperature=1.0), seed=1))
    bad = [
        VerifyItem("s", 0, 2, [4]),  # missing
        VerifyItem("s", 0, 2, [4], [[4, 5]], [[0.5]]),  # ragged
        VerifyItem("s", 0, 2, [4], [[4, 5]], [[0.9, 0.3]]),  # does not sum to 1
        VerifyItem("s", 0, 2, [4], [[6, 5]], [[0.5, 0.5]]),  # drafted id not in its support
        VerifyItem("s", 0, 2, [4], [[4, VOCAB]], [[0.5, 0.5]]),  # id out of range
    ]
    for item in bad:
        (res,) = core.verify_batch([item])
        assert isinstance(res, WispError), item
        assert res.code in (ErrorCode.BAD_REQUEST, ErrorCode.OUT_OF_VOCABULARY)
    (ok,) = core.verify_batch([VerifyItem("s", 0, 2, [4], [[4, 5]], [[0.75, 0.25]])])
    assert not isinstance(ok, WispError) and 1 <= len(ok.new_tokens) <= 2
