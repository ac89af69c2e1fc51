"""DrafterCore: batched drafting, batched policies, features, rollback after a verdict."""

import math

import pytest
import torch

from common.engine.drafter import DrafterCore
from common.engine.features import DRAFT_FEATURES, draft_features
from common.engine.policies import DraftPolicy, DraftStep, FixedK, PolicyCatalog
from common.errors import ErrorCode, WispError
from common.models.paged_runner import PagedRunner
from common.protocol import SamplingParams, SessionSpec
from tests.unit.tiny_random_models import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_drafter(model, k_max=6, eos=None):
    return DrafterCore(PagedRunner(model, num_blocks=256, block_size=4), eos, k_max=k_max)


def open_(d, sid, prompt, max_new, policy, params=None, seed=None, k_max=6):
    spec = SessionSpec(sid=sid, mode="sled", max_new_tokens=max_new,
                       sampling=params or SamplingParams(), seed=seed, k_max=k_max)
    d.open(spec, prompt, policy)


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
        open_(together, sid, p, 50, FixedK(5))
    drafts = together.draft(list(prompts))
    for sid, p in prompts.items():
        assert drafts[sid].token_ids == greedy_continuation(model, p, 5)
        assert drafts[sid].base_len == len(p) and len(drafts[sid].features) == 5
        pos = DRAFT_FEATURES.index("position")
        assert [row[pos] for row in drafts[sid].features] == [0, 1, 2, 3, 4]


def test_sessions_joining_mid_draft_get_the_drafts_they_would_alone(model):
    """Continuous batching (begin/step): b joins a's draft two steps in, c after b's verdict;
    each draft, its positions and the base it extends are what drafting alone gives."""
    prompts = {"a": [1, 2, 3], "b": [9] * 11, "c": [4, 5]}
    d = make_drafter(model)
    for sid, p in prompts.items():
        open_(d, sid, p, 50, FixedK(5))
    assert d.begin(["a"]) == {} and d.drafting == 1
    done = {**d.step(), **d.step()}
    done.update(d.begin(["b"]))
    while "b" not in done:
        done.update(d.step())
    assert "a" in done and d.drafting == 0  # a ended 2 steps before b
    d.apply("b", 2, done["b"].token_ids[:2] + [7])
    done.update(d.begin(["c", "b"]))
    while d.drafting:
        done.update(d.step())
    pos = DRAFT_FEATURES.index("position")
    for sid, p in prompts.items():
        base = p + ([] if sid != "b" else greedy_continuation(model, p, 2) + [7])
        assert done[sid].token_ids == greedy_continuation(model, base, 5)
        assert done[sid].base_len == len(base)
        assert [row[pos] for row in done[sid].features] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="in progress"):
        d.begin(["a"])
        d.draft(["c"])
    d.close("a")  # closing a session drops its draft in progress
    assert d.drafting == 0


def test_cumulative_confidence_and_last_rounds_acceptance_features(model):
    d = make_drafter(model)
    open_(d, "s", [7, 8, 9], 50, FixedK(4))
    conf, cum, prev = (DRAFT_FEATURES.index(n) for n in
                       ("confidence", "cum_confidence", "prev_accept_rate"))
    rows = d.draft(["s"])["s"].features
    running = 1.0
    for row in rows:
        running *= row[conf]
        assert row[cum] == pytest.approx(running, rel=1e-5)
        assert row[prev] == 1.0  # no verdict yet
    draft = d.last_draft("s") if hasattr(d, "last_draft") else d.sessions["s"].last_draft
    d.apply("s", 1, draft.token_ids[:1] + [(draft.token_ids[1] + 1) % 97])
    assert all(row[prev] == 0.25 for row in d.draft(["s"])["s"].features)  # 1 of 4 accepted


def test_verdict_rolls_back_and_next_round_continues_from_committed(model):
    d = make_drafter(model)
    open_(d, "s", [7, 8, 9], 50, FixedK(4))
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
    open_(d, "s", [1, 2], 3, FixedK(6))
    assert len(d.draft(["s"])["s"].token_ids) == 2  # 3 new tokens max: 2 drafts + 1 bonus
    first = greedy_continuation(model, [1, 2], 1)[0]
    d_eos = make_drafter(model, eos=first)
    open_(d_eos, "s", [1, 2], 50, FixedK(6))
    assert d_eos.draft(["s"])["s"].token_ids == [first]  # nothing drafted past EOS


class StopAfter(DraftPolicy):
    """Keeps the first n tokens of every draft; records each step it was asked about."""

    name = "stop-after"

    def __init__(self, n):
        super().__init__()
        self.n, self.steps, self.feedback = n, [], []

    def last(self, step: DraftStep) -> torch.Tensor:
        self.steps.append((list(step.sids), step.positions.tolist(), tuple(step.features.shape)))
        return step.positions >= self.n - 1

    def observe(self, feedback):
        self.feedback.append(feedback)


def test_policy_decides_a_whole_step_at_once_and_receives_feedback(model):
    d = make_drafter(model)
    policy = StopAfter(2)
    for sid, prompt in (("a", [3, 3, 3]), ("b", [5, 6])):
        open_(d, sid, prompt, 50, policy)
    open_(d, "c", [7, 8], 50, FixedK(4))  # another policy in the same steps
    drafts = d.draft(["a", "b", "c"])
    assert [len(drafts[s].token_ids) for s in "abc"] == [2, 2, 4]
    # One call per draft step for both of its sessions, with a [B, F] feature batch.
    f = len(DRAFT_FEATURES)
    assert policy.steps == [(["a", "b"], [0, 0], (2, f)), (["a", "b"], [1, 1], (2, f))]
    d.apply("a", 1, drafts["a"].token_ids[:1] + [0])
    (fb,) = policy.feedback
    assert (fb.sid, fb.num_drafted, fb.num_accepted) == ("a", 2, 1)
    assert tuple(fb.features.shape) == (2, f)


def test_sampling_drafts_carry_sparse_distributions(model):
    d = make_drafter(model)
    params = SamplingParams(temperature=0.8, draft_top_m=5)
    open_(d, "s", [1, 2, 3], 50, FixedK(3), params=params, seed=11)
    draft = d.draft(["s"])["s"]
    assert len(draft.sparse_ids) == 3 and all(len(r) == 5 for r in draft.sparse_ids)
    for tok, ids, probs in zip(draft.token_ids, draft.sparse_ids, draft.sparse_probs, strict=True):
        assert tok in ids and math.isclose(sum(probs), 1.0, rel_tol=1e-5)


def test_mismatched_verdict_is_refused(model):
    d = make_drafter(model)
    open_(d, "s", [1, 2], 50, FixedK(3))
    draft = d.draft(["s"])["s"]
    with pytest.raises(WispError) as err:
        d.apply("s", 2, [(draft.token_ids[0] + 1) % 97, 5, 6])
    assert err.value.code == ErrorCode.BASE_MISMATCH


def test_features_on_crafted_logits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))
    (row,) = draft_features(logits, torch.tensor([3])).tolist()
    f = dict(zip(DRAFT_FEATURES, row, strict=True))
    assert f["confidence"] == pytest.approx(0.5) and f["margin"] == pytest.approx(0.25)
    assert f["entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert f["std"] == pytest.approx(
        torch.tensor([0.5, 0.25, 0.25, 0.0]).std(unbiased=False).item())
    assert f["position"] == 3


def test_policy_catalog_builds_once_per_spec_and_rejects_unknown():
    catalog = PolicyCatalog.standard()
    assert catalog.get("fixed:3") is catalog.get("fixed:3")
    assert catalog.get("fixed:3").k == 3 and catalog.get("fixed").k is None
    assert catalog.for_session("sled", None) is catalog.get("fixed")
    with pytest.raises(ValueError):
        catalog.get("fixed:x")
    with pytest.raises(ValueError, match="unknown draft policy"):
        catalog.get("oracle")
    with pytest.raises(WispError) as err:
        catalog.for_session("wisp", None)  # no policy for this mode here yet
    assert err.value.code == ErrorCode.BAD_REQUEST
    # An edge serves edge modes only; colocated drafting is the scheduler's catalog.
    assert catalog.modes == ("sled",)
    with pytest.raises(WispError):
        catalog.for_session("colocated", None)
    assert PolicyCatalog.standard(("colocated",)).for_session("colocated", None).k is None


def test_round_limit_is_the_smallest_of_policy_session_and_core(model):
    d = make_drafter(model, k_max=6)
    open_(d, "s", [1, 2, 3], 50, FixedK(), k_max=3)  # FixedK(): the session's k_max
    assert len(d.draft(["s"])["s"].token_ids) == 3


def test_resync_adopts_tokens_committed_elsewhere(model):
    d = make_drafter(model)
    open_(d, "s", [4, 5, 6], 50, FixedK(4))
    draft = d.draft(["s"])["s"]
    foreign = [(draft.token_ids[0] + 1) % 97, 11]  # another edge's round: not our draft
    with pytest.raises(WispError):
        d.apply("s", 1, foreign)
    d.resync("s", [4, 5, 6] + foreign)
    assert d.committed("s") == [4, 5, 6] + foreign
    assert d.draft(["s"])["s"].token_ids == greedy_continuation(model, [4, 5, 6] + foreign, 4)
