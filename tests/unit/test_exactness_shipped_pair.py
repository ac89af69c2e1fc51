"""Greedy exactness on the shipped tiny pair (fp32, CPU): every path equals the target's own
greedy output token for token — alone, in mixed batches with cold prefills, k_max in {1,4,8},
target-only, and with a KV budget so small that sessions are evicted and rebuilt mid-run."""

import pytest

from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import FixedK
from tests.shipped import MAX_NEW, greedy_cases, shipped_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    return shipped_pair()


@pytest.fixture(scope="module")
def cases(pair):
    return greedy_cases(per_domain=12)


def engine(pair, k_max, draft=True, **runner_kw):
    draft_m, target_m = pair
    return InProcessEngine.from_models(draft_m if draft else None, target_m, k_max, **runner_kw)


def requests(prompts, k_max, stagger):
    return [GenerationRequest(p, MAX_NEW, policy=FixedK(k_max), start_step=i * stagger)
            for i, p in enumerate(prompts)]


def test_there_are_at_least_20_held_out_prompts(cases):
    prompts, refs = cases
    assert len(prompts) >= 20 and all(len(r) > 0 for r in refs)


@pytest.mark.parametrize("k_max", [1, 4, 8])
def test_mixed_batches_with_cold_prefills_equal_target_greedy(pair, cases, k_max):
    prompts, refs = cases
    eng = engine(pair, k_max)
    # A new session joins every step: each verify batch mixes one cold prefill with warm
    # verifies of other cached lengths and draft lengths.
    results = eng.generate_many(requests(prompts, k_max, stagger=1))
    # Most sessions' first round (a cold prefill) shared its forward pass with warm verifies.
    mixed_cold = sum(res.rounds[0].batch_size > 1 for res in results[1:])
    assert mixed_cold >= len(results) // 2, mixed_cold
    for prompt_no, (res, ref) in enumerate(zip(results, refs, strict=True)):
        assert res.token_ids == ref, f"prompt {prompt_no} diverged"
    assert sum(res.num_accepted for res in results) > 0  # the draft did real work


@pytest.mark.parametrize("k_max", [1, 4, 8])
def test_each_request_alone_equals_target_greedy(pair, cases, k_max):
    prompts, refs = cases
    eng = engine(pair, k_max)
    for p, ref in zip(prompts[::3], refs[::3], strict=True):
        assert eng.generate(GenerationRequest(p, MAX_NEW, policy=FixedK(k_max))).token_ids == ref


def test_target_only_decoding_equals_target_greedy(pair, cases):
    prompts, refs = cases
    results = engine(pair, 4, draft=False).generate_many(requests(prompts, 4, stagger=2))
    assert [r.token_ids for r in results] == refs


def test_eviction_and_rebuild_keep_output_exact(pair, cases):
    prompts, refs = cases
    # Room for only a few sessions' KV: idle sessions are evicted and re-prefilled each round.
    eng = engine(pair, 4, num_blocks=48, block_size=16)
    results = eng.generate_many(requests(prompts, 4, stagger=0))
    assert [r.token_ids for r in results] == refs
    assert eng.verifier.runner.evicted(), "the budget was meant to force evictions"
