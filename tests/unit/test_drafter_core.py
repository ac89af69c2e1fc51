"""DrafterCore: batched drafting, policies, features, rollback after a verdict."""

import math

import pytest
import torch

from common.errors import WispError
from common.models.paged_runner import PagedRunner
from common.sampling import SamplingParams
from services.edge_drafter.core import DrafterCore
from services.edge_drafter.features import token_features
from services.edge_drafter.policies import DraftPolicy, FixedK, policy_factory
from tests.unit.tiny_random_models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_drafter(model, k_max=6, eos=None):
    return DrafterCore(PagedRunner(model, num_blocks=256, block_size=4), eos, k_max=k_max)


def greedy_continuation(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_batched_drafts_equal_each_session_drafted_alone(model):
    prompts = {"a": [1, 2, 3], "b": [9] * 11, "c": [4, 5]}
    together = make_drafter(model)
    for sid, p in prompts.items():
        together.open(sid, p, 50, SamplingParams(), FixedK(5, 6))
    drafts = together.draft(list(prompts))
    for sid, p in prompts.items():
        assert drafts[sid].token_ids == greedy_continuation(model, p, 5)
        assert drafts[sid].base_len == len(p) and len(drafts[sid].features) == 5


def test_verdict_rolls_back_and_next_round_continues_from_committed(model):
    d = make_drafter(model)
    d.open("s", [7, 8, 9], 50, SamplingParams(), FixedK(4, 6))
    draft = d.draft(["s"])["s"]
    correction = (draft.token_ids[2] + 1) % 97
    d.apply("s", 2, draft.token_ids[:2] + [correction])
    committed = [7, 8, 9] + draft.token_ids[:2] + [correction]
    assert d.committed("s") == committed
    assert d.runner.cached_len("s") == len(committed) - 1
    nxt = d.draft(["s"])["s"]
    assert nxt.token_ids == greedy_continuation(model, committed, 4)


def test_round_limit_respects_remaining_budget_and_eos(model):
    d = make_drafter(model)
    d.open("s", [1, 2], 3, SamplingParams(), FixedK(6, 6))
    assert len(d.draft(["s"])["s"].token_ids) == 2  # 3 new tokens max: 2 drafts + 1 bonus
    first = greedy_continuation(model, [1, 2], 1)[0]
    d_eos = make_drafter(model, eos=first)
    d_eos.open("s", [1, 2], 50, SamplingParams(), FixedK(6, 6))
    assert d_eos.draft(["s"])["s"].token_ids == [first]  # nothing drafted past EOS


class StopAfter(DraftPolicy):
    name = "stop-after"

    def __init__(self, n):
        super().__init__(6)
        self.n, self.feedback = n, []

    def round_limit(self):
        return 6

    def keep(self, position, features):
        return position < self.n

    def observe(self, feedback):
        self.feedback.append(feedback)


def test_policy_can_drop_a_token_and_receives_feedback(model):
    d = make_drafter(model)
    policy = StopAfter(2)
    d.open("s", [3, 3, 3], 50, SamplingParams(), policy)
    draft = d.draft(["s"])["s"]
    assert len(draft.token_ids) == 2
    d.apply("s", 1, draft.token_ids[:1] + [0])
    assert policy.feedback[0].num_drafted == 2 and policy.feedback[0].num_accepted == 1


def test_sampling_drafts_carry_sparse_distributions(model):
    d = make_drafter(model)
    params = SamplingParams(temperature=0.8, draft_top_m=5)
    d.open("s", [1, 2, 3], 50, params, FixedK(3, 6), seed=11)
    draft = d.draft(["s"])["s"]
    assert len(draft.sparse_ids) == 3 and all(len(r) == 5 for r in draft.sparse_ids)
    for tok, ids, probs in zip(draft.token_ids, draft.sparse_ids, draft.sparse_probs, strict=True):
        assert tok in ids and math.isclose(sum(probs), 1.0, rel_tol=1e-5)


def test_mismatched_verdict_is_refused(model):
    d = make_drafter(model)
    d.open("s", [1, 2], 50, SamplingParams(), FixedK(3, 6))
    draft = d.draft(["s"])["s"]
    with pytest.raises(WispError):
        d.apply("s", 2, [(draft.token_ids[0] + 1) % 97, 5, 6])


def test_features_on_crafted_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))
    (f,) = token_features(logits)
    assert f.confidence == pytest.approx(0.5) and f.margin == pytest.approx(0.25)
    assert f.entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert f.std == pytest.approx(torch.tensor([0.5, 0.25, 0.25, 0.0]).std(unbiased=False).item())


def test_policy_factory_parses_and_rejects():
    assert policy_factory("fixed:3", 8)().round_limit() == 3
    assert policy_factory("fixed", 8)().round_limit() == 8
    with pytest.raises(ValueError):
        policy_factory("fixed:9", 8)
    with pytest.raises(ValueError):
        policy_factory("oracle", 8)


def test_resync_adopts_tokens_committed_elsewhere(model):
    d = make_drafter(model)
    d.open("s", [4, 5, 6], 50, SamplingParams(), FixedK(4, 6))
    draft = d.draft(["s"])["s"]
    foreign = [(draft.token_ids[0] + 1) % 97, 11]  # another edge's round: not our draft
    with pytest.raises(WispError):
        d.apply("s", 1, foreign)
    d.resync("s", [4, 5, 6] + foreign)
    assert d.committed("s") == [4, 5, 6] + foreign
    assert d.draft(["s"])["s"].token_ids == greedy_continuation(model, [4, 5, 6] + foreign, 4)
