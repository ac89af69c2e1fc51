"""Sampling exactness through the whole in-process path (drafter core → sparse top-m draft
distributions → batched verify → speculative acceptance): the distribution of the first two
generated tokens equals the target's own sampling distribution (chi-square), and a control
shows the same check rejects the draft's distribution."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from common.engine.drafter import DrafterCore
from common.engine.inprocess import GenerationRequest, InProcessEngine
from common.engine.policies import FixedK
from common.engine.verifier import VerifierCore
from common.models.paged_runner import PagedRunner
from common.sampling import SamplingParams, target_probs
from tests.unit.tiny_random_models import tiny_llama

V = 8
N = 4000
PROMPT = [1, 2, 3]
PARAMS = SamplingParams(temperature=0.9, top_k=6, top_p=0.97, draft_top_m=4)


def peaky(seed: int):
    model = tiny_llama(seed=seed, vocab_size=V)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # random init is near uniform; sharpen it
    return model


@torch.no_grad()
def joint_probs(model, params: SamplingParams) -> torch.Tensor:
    """[V, V]: probability of generating (t1, t2) after PROMPT under `params`."""
    p1 = target_probs(model(torch.tensor([PROMPT])).logits[0, -1:], params)[0]
    rows = [target_probs(model(torch.tensor([PROMPT + [t]])).logits[0, -1:], params)[0]
            for t in range(V)]
    return p1[:, None] * torch.stack(rows)


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    obs, exp = observed.flatten().double(), expected_probs.flatten().double() * N
    keep = exp >= 5  # pool sparse cells so the chi-square approximation holds
    obs = torch.cat([obs[keep], obs[~keep].sum(0, keepdim=True)])
    exp = torch.cat([exp[keep], exp[~keep].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.fixture(scope="module")
def sampled():
    torch.manual_seed(0)
    target, draft = peaky(3), peaky(4)
    engine = InProcessEngine(
        VerifierCore(PagedRunner(target, num_blocks=4 * N, block_size=4), None),
        DrafterCore(PagedRunner(draft, num_blocks=4 * N, block_size=4), None, k_max=1), k_max=1)
    results = engine.generate_many([GenerationRequest(PROMPT, 2, PARAMS, seed=i,
                                                      policy=FixedK(1)) for i in range(N)])
    counts = torch.zeros(V, V)
    for r in results:
        counts[r.token_ids[0], r.token_ids[1]] += 1
    accepted = sum(r.num_accepted for r in results)
    return target, draft, counts, accepted


def test_generated_pairs_follow_the_targets_distribution(sampled):
    target, _, counts, accepted = sampled
    assert 0.1 * N < accepted < 0.95 * N  # both acceptance and rejection paths were exercised
    assert chi2_pvalue(counts, joint_probs(target, PARAMS)) > 1e-3


def test_control_the_check_rejects_the_drafts_distribution(sampled):
    _, draft, counts, _ = sampled
    assert chi2_pvalue(counts, joint_probs(draft, PARAMS)) < 1e-6


def test_tokens_outside_top_k_never_appear(sampled):
    target, _, counts, _ = sampled
    support = joint_probs(target, PARAMS) > 0
    assert all(counts[a, b] == 0 for a, b in itertools.product(range(V), range(V))
               if not support[a, b])


def test_a_policy_that_stops_on_draft_confidence_keeps_the_targets_distribution():
    """Stopping on the draft's own confidence (what WISP's predictor reads) decides how many
    tokens go to verification, never which: the output distribution stays the target's."""
    from common.engine.policies import ConfidenceStop

    torch.manual_seed(1)
    target, draft = peaky(3), peaky(4)
    engine = InProcessEngine(
        VerifierCore(PagedRunner(target, num_blocks=4 * N, block_size=4), None),
        DrafterCore(PagedRunner(draft, num_blocks=4 * N, block_size=4), None, k_max=3), k_max=3)
    # The draft's confidence is 0.223 after PROMPT and 0.19-0.29 after one more token,
    # depending on the sampled first token: at 0.22 the first round ends with its second
    # token or drafts a third, by that token (max_new_tokens 4 leaves room for 3).
    policy = ConfidenceStop(0.22)
    results = engine.generate_many([GenerationRequest(PROMPT, 4, PARAMS, seed=N + i,
                                                      policy=policy) for i in range(N)])
    counts = torch.zeros(V, V)
    for r in results:
        counts[r.token_ids[0], r.token_ids[1]] += 1
    first_drafts = {r.rounds[0].drafted for r in results}
    assert first_drafts == {2, 3}, first_drafts  # the policy really varied the length
    assert chi2_pvalue(counts, joint_probs(target, PARAMS)) > 1e-3
