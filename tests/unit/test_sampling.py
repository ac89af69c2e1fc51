"""Unit tests for common.sampling: parameters, distributions, sampling, acceptance rules."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling import (
    RESIDUAL_EPS,
    SamplingParams,
    densify_sparse,
    draft_sparse,
    greedy_accept,
    residual_distribution,
    sample_probs,
    sample_sparse,
    speculative_accept,
    speculative_accept_batch,
    target_probs,
)


def logits_of(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax (temperature 1) is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log().to(torch.float32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0)


# -- SamplingParams ------------------------------------------------------------------------


def test_params_defaults_are_greedy():
    params = SamplingParams()
    assert params.greedy
    assert (params.temperature, params.top_p, params.top_k, params.draft_top_m) == (0.0, 1.0, 0, 8)
    assert not SamplingParams(temperature=0.7).greedy


def test_params_frozen_and_slotted():
    params = SamplingParams(temperature=1.0)
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # type: ignore[misc]
    assert not hasattr(params, "__dict__")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"draft_top_m": 0}, "draft_top_m"),
        ({"draft_top_m": -3}, "draft_top_m"),
        ({"draft_top_m": 1.5}, "draft_top_m"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_accept_edge_values():
    SamplingParams(temperature=1e-4, top_p=1.0, top_k=0, draft_top_m=1)
    SamplingParams(temperature=2, top_p=1e-6, top_k=1)


# -- target_probs --------------------------------------------------------------------------


def test_target_probs_plain_softmax():
    probs = target_probs(logits_of([0.1, 0.2, 0.3, 0.4]), SamplingParams(temperature=1.0))
    assert probs.dtype == torch.float32 and probs.shape == (1, 4)
    assert_close(probs, [[0.1, 0.2, 0.3, 0.4]])


def test_target_probs_temperature():
    # logits (0, ln 4) at temperature 2 -> weights (1, 2) -> (1/3, 2/3)
    logits = torch.tensor([[0.0, math.log(4.0)]])
    assert_close(target_probs(logits, SamplingParams(temperature=2.0)), [[1 / 3, 2 / 3]])
    # temperature 0.5 squares the weights: (1, 16) -> (1/17, 16/17)
    assert_close(target_probs(logits, SamplingParams(temperature=0.5)), [[1 / 17, 16 / 17]])


def test_target_probs_top_k():
    # unsorted vocabulary so the kept set must be scattered back to the right ids
    logits = logits_of([0.3, 0.1, 0.4, 0.2])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert_close(probs, [[3 / 7, 0.0, 4 / 7, 0.0]])
    # top_k >= V is a no-op
    assert_close(target_probs(logits, SamplingParams(temperature=1.0, top_k=10)),
                 [[0.3, 0.1, 0.4, 0.2]])


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.7, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),  # 0.5 < 0.7 <= 0.8: two tokens
        (0.8, [0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]),  # mass reached exactly at 0.8: still two
        (0.81, [0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),  # needs the third
        (0.1, [0.0, 1.0, 0.0, 0.0]),  # top token always kept
        (1.0, [0.05, 0.5, 0.15, 0.3]),  # off
    ],
)
def test_target_probs_top_p(top_p, expected):
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert_close(target_probs(logits, SamplingParams(temperature=1.0, top_p=top_p)), [expected])


def test_target_probs_top_k_before_top_p():
    # top-k=2 renormalises (0.4, 0.3) to (4/7, 3/7); top-p=0.5 is then met by 4/7 alone.
    # (top-p on the raw distribution would have kept two tokens: 0.4 < 0.5.)
    logits = logits_of([0.1, 0.4, 0.2, 0.3])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert_close(probs, [[0.0, 1.0, 0.0, 0.0]])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6))
    assert_close(probs, [[0.0, 4 / 7, 0.0, 3 / 7]])


def test_target_probs_temperature_then_top_p():
    # temperature 0.5 turns (0.5, 0.3, 0.2) into weights (0.25, 0.09, 0.04) / 0.38,
    # whose top token alone (0.658) meets top_p = 0.6.
    logits = logits_of([0.5, 0.3, 0.2])
    assert_close(target_probs(logits, SamplingParams(temperature=0.5, top_p=0.6)),
                 [[1.0, 0.0, 0.0]])
    assert_close(target_probs(logits, SamplingParams(temperature=0.5, top_p=0.7)),
                 [[0.25 / 0.34, 0.09 / 0.34, 0.0]])


def test_target_probs_rows_independent_and_masked_tokens():
    logits = torch.cat([logits_of([0.5, 0.3, 0.2]),
                        torch.tensor([[float("-inf"), 0.0, 0.0]])])
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert_close(probs, [[0.625, 0.375, 0.0], [0.0, 0.5, 0.5]])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-300),  # vanishing temperature: the argmax
    SamplingParams(temperature=5e-324),  # the smallest positive float
    SamplingParams(temperature=1.0, top_p=1e-300),  # vanishing nucleus: the top token
    SamplingParams(temperature=1.0, top_k=1),
])
def test_degenerate_values_give_the_argmax_exactly(params):
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 4.0, 3.0, -50.0]])
    assert_close(target_probs(logits, params), [[0, 1, 0, 0], [1, 0, 0, 0]], atol=0)
    if params.top_p == 1.0 and params.top_k == 0:  # the draft reads temperature, not top-k/p
        ids, probs = draft_sparse(logits, params)
        assert ids[:, 0].tolist() == [1, 0] and probs[:, 0].tolist() == [1.0, 1.0]


def test_degenerate_values_keep_ties_and_reach_the_uniform_limit():
    ties = torch.tensor([[3.0, 3.0, 1.0]])
    assert_close(target_probs(ties, SamplingParams(temperature=1e-300)), [[0.5, 0.5, 0.0]])
    hot = target_probs(torch.tensor([[0.0, 10.0, -10.0]]), SamplingParams(temperature=1e300))
    assert_close(hot, [[1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(
        target_probs(torch.tensor([[0.0, 1.0]]), SamplingParams(temperature=1.0, top_k=10**9)),
        target_probs(torch.tensor([[0.0, 1.0]]), SamplingParams(temperature=1.0)))


def test_target_probs_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.0, 3.0]])
    probs = target_probs(logits, SamplingParams(temperature=0.0, top_k=1))
    assert_close(probs, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "logits",
    [
        torch.zeros(4),  # 1-D
        torch.zeros(2, 3, 4),  # 3-D
        torch.zeros(2, 4, dtype=torch.int64),  # not float
        torch.zeros(2, 0),  # empty vocabulary
        torch.tensor([[0.0, float("nan")]]),
        torch.tensor([[float("-inf"), float("-inf")]]),
        torch.tensor([[0.0, float("inf")]]),
    ],
)
def test_target_probs_malformed(logits):
    with pytest.raises(ValueError):
        target_probs(logits, SamplingParams(temperature=1.0))


def test_target_probs_greedy_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        target_probs(torch.tensor([[0.0, float("nan")]]), SamplingParams())


# -- draft_sparse --------------------------------------------------------------------------


def test_draft_sparse_orders_and_renormalises():
    logits = logits_of([0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4])
    ids, probs = draft_sparse(logits, SamplingParams(temperature=1.0, draft_top_m=2))
    assert ids.dtype == torch.int64 and probs.dtype == torch.float32
    assert ids.tolist() == [[0, 2], [3, 2]]
    assert_close(probs, [[4 / 7, 3 / 7], [4 / 7, 3 / 7]])


def test_draft_sparse_temperature_applies_before_truncation():
    # temperature 0.5: weights (0.16, 0.01, 0.09, 0.04); top-2 -> (0.16, 0.09) / 0.25
    ids, probs = draft_sparse(logits_of([0.4, 0.1, 0.3, 0.2]),
                              SamplingParams(temperature=0.5, draft_top_m=2))
    assert ids.tolist() == [[0, 2]]
    assert_close(probs, [[0.64, 0.36]])


def test_draft_sparse_m_capped_at_vocab():
    ids, probs = draft_sparse(logits_of([0.2, 0.5, 0.3]),
                              SamplingParams(temperature=1.0, draft_top_m=8))
    assert ids.tolist() == [[1, 2, 0]]
    assert_close(probs, [[0.5, 0.3, 0.2]])


def test_draft_sparse_ignores_target_side_filters():
    # top-k / top-p are target-side settings; the draft's q is plain top-m.
    params = SamplingParams(temperature=1.0, top_k=1, top_p=0.1, draft_top_m=3)
    ids, probs = draft_sparse(logits_of([0.2, 0.5, 0.3]), params)
    assert ids.tolist() == [[1, 2, 0]]
    assert_close(probs, [[0.5, 0.3, 0.2]])


def test_draft_sparse_greedy():
    ids, probs = draft_sparse(torch.tensor([[0.1, 3.0, 2.0, -1.0]]),
                              SamplingParams(draft_top_m=3))
    assert ids.tolist() == [[1, 2, 0]]
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "logits",
    [torch.zeros(4), torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 0),
     torch.tensor([[float("nan"), 0.0]])],
)
def test_draft_sparse_malformed(logits):
    with pytest.raises(ValueError):
        draft_sparse(logits, SamplingParams(temperature=1.0))


# -- sampling ------------------------------------------------------------------------------


def test_sample_sparse_reproducible_and_in_support():
    ids = torch.tensor([[7, 3, 9]] * 2000)
    probs = torch.tensor([[0.6, 0.0, 0.4]] * 2000)
    a = sample_sparse(ids, probs, gen(5))
    b = sample_sparse(ids, probs, gen(5))
    assert a.dtype == torch.int64 and a.shape == (2000,)
    assert torch.equal(a, b)
    assert set(a.tolist()) == {7, 9}  # zero-probability id 3 never drawn
    assert abs((a == 7).double().mean().item() - 0.6) < 0.05


def test_sample_probs_reproducible_and_in_support():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]] * 2000)
    a = sample_probs(probs, gen(1))
    assert torch.equal(a, sample_probs(probs, gen(1)))
    assert set(a.tolist()) == {1, 3}
    assert abs((a == 3).double().mean().item() - 0.75) < 0.05
    assert sample_probs(torch.tensor([[0.0, 0.0, 1.0]]), gen()).tolist() == [2]


def test_sample_probs_trailing_zero_tail_is_never_drawn():
    # a uniform at the very top of [0, 1) must not run onto zero-probability trailing ids
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5000)
    assert int(sample_probs(probs, gen(2)).max()) <= 1


def test_inverse_cdf_edges_never_hit_zero_weight_columns():
    from common.sampling import _inverse_cdf

    w = torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.0, 0.0]] * 3, dtype=torch.float64)
    # u = 0 skips the leading zero; u -> 1 (here past it, as if u * total rounded up to
    # total) stops at the last positive column rather than the zero tail.
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert _inverse_cdf(w, u).tolist() == [1, 3, 3]


@pytest.mark.parametrize(
    ("ids", "probs"),
    [
        (torch.tensor([1, 2]), torch.tensor([0.5, 0.5])),  # 1-D
        (torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.3, 0.2]])),  # shape mismatch
        (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])),  # float ids
        (torch.tensor([[1, 2]]), torch.tensor([[1, 0]])),  # int probs
        (torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 0)),  # m = 0
    ],
)
def test_sample_sparse_malformed(ids, probs):
    with pytest.raises(ValueError):
        sample_sparse(ids, probs, gen())


@pytest.mark.parametrize(
    "probs",
    [torch.tensor([0.5, 0.5]), torch.tensor([[1, 0]]), torch.zeros(1, 0)],
)
def test_sample_probs_malformed(probs):
    with pytest.raises(ValueError):
        sample_probs(probs, gen())


def test_sampling_rejects_non_generator():
    with pytest.raises(ValueError, match="Generator"):
        sample_probs(torch.tensor([[1.0]]), 123)  # type: ignore[arg-type]


# -- greedy_accept -------------------------------------------------------------------------


def one_hot_logits(argmaxes: list[int], vocab: int = 5) -> torch.Tensor:
    """[len, vocab] logits with the given argmax per row (and a distractor at id 0)."""
    logits = torch.zeros(len(argmaxes), vocab)
    logits[:, 0] = 1.0
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 3.0
    return logits


def test_greedy_accept_all_then_bonus_from_last_row():
    assert greedy_accept([2, 4, 1], one_hot_logits([2, 4, 1, 3])) == (3, 3)


def test_greedy_accept_first_token_mismatch():
    assert greedy_accept([2, 4, 1], one_hot_logits([3, 4, 1, 3])) == (0, 3)


def test_greedy_accept_middle_mismatch():
    # row 2 would match, but acceptance stops at the first mismatch
    assert greedy_accept([2, 4, 1], one_hot_logits([2, 0, 1, 3])) == (1, 0)


def test_greedy_accept_k_zero_is_target_argmax():
    assert greedy_accept([], one_hot_logits([4])) == (0, 4)


def test_greedy_accept_accepts_tensor_and_numpy_like_ids():
    assert greedy_accept(torch.tensor([2, 4]), one_hot_logits([2, 4, 1])) == (2, 1)
    assert greedy_accept((2, 3), one_hot_logits([2, 4, 1])) == (1, 4)


@pytest.mark.parametrize(
    ("draft", "logits"),
    [
        ([2, 4], one_hot_logits([2, 4])),  # k+1 rows expected, got k
        ([2], one_hot_logits([2, 4, 1])),  # too many rows
        ([2.0], one_hot_logits([2, 4])),  # non-int id
        ([True], one_hot_logits([2, 4])),  # bool is not a token id
        ("ab", one_hot_logits([2, 4, 1])),  # not a sequence of ints
        ([2], torch.zeros(10)),  # 1-D logits
        ([2], torch.zeros(2, 5, dtype=torch.int64)),  # int logits
        ([2], torch.tensor([[0.0, float("nan"), 0, 0, 0], [0.0] * 5])),
    ],
)
def test_greedy_accept_malformed(draft, logits):
    with pytest.raises(ValueError):
        greedy_accept(draft, logits)


# -- speculative_accept: deterministic cases and validation -------------------------------


def sparse(rows: list[list[tuple[int, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[i for i, _ in row] for row in rows], dtype=torch.int64)
    probs = torch.tensor([[p for _, p in row] for row in rows], dtype=torch.float32)
    return ids, probs


def test_speculative_accept_target_certain_of_drafts_accepts_all_and_takes_bonus():
    ids, probs = sparse([[(2, 0.5), (1, 0.5)], [(0, 0.9), (3, 0.1)]])
    target = torch.eye(4)[[2, 3, 1]]  # p = one-hot(draft) at both positions, bonus one-hot(1)
    for seed in range(20):
        assert speculative_accept([2, 3], ids, probs, target, gen(seed)) == (2, 1)


def test_speculative_accept_zero_target_prob_always_rejects_into_residual():
    ids, probs = sparse([[(2, 0.7), (1, 0.3)]])
    target = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.25] * 4])
    seen = set()
    for seed in range(40):
        n, tok = speculative_accept([2], ids, probs, target, gen(seed))
        assert n == 0
        seen.add(tok)
    # residual max(0, p - q) = (0, 0.2, 0, 0.5): id 1 and id 3 only
    assert seen == {1, 3}


def test_speculative_accept_k_zero_samples_target():
    empty_ids, empty_probs = torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3)
    target = torch.tensor([[0.0, 0.0, 1.0]])
    assert speculative_accept([], empty_ids, empty_probs, target, gen()) == (0, 2)


def test_speculative_accept_greedy_target_matches_greedy_accept():
    # with one-hot target probs (greedy params) speculative acceptance is greedy acceptance
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    draft_logits = torch.randn(3, 6)
    t_p = target_probs(logits, SamplingParams())
    d_ids, d_probs = draft_sparse(draft_logits, SamplingParams(temperature=1.0, draft_top_m=4))
    for seed in range(30):
        draft = sample_sparse(d_ids, d_probs, gen(seed)).tolist()
        assert (speculative_accept(draft, d_ids, d_probs, t_p, gen(seed))
                == greedy_accept(draft, logits))


def test_speculative_accept_reproducible_and_equal_to_batch_of_one():
    torch.manual_seed(1)
    params = SamplingParams(temperature=1.0, draft_top_m=3)
    t_p = target_probs(torch.randn(4, 8), params)
    d_ids, d_probs = draft_sparse(torch.randn(3, 8), params)
    draft = d_ids[:, 0].tolist()
    outs = [speculative_accept(draft, d_ids, d_probs, t_p, gen(s)) for s in range(10)]
    assert outs == [speculative_accept(draft, d_ids, d_probs, t_p, gen(s)) for s in range(10)]
    for s, (n, tok) in enumerate(outs):
        bn, btok = speculative_accept_batch(torch.tensor([draft]), d_ids[None], d_probs[None],
                                            t_p[None], gen(s))
        assert (int(bn[0]), int(btok[0])) == (n, tok)


def test_speculative_accept_batch_shapes():
    params = SamplingParams(temperature=1.0, draft_top_m=2)
    t_p = target_probs(torch.randn(5 * 3, 7), params).view(5, 3, 7)
    d_ids, d_probs = draft_sparse(torch.randn(5 * 2, 7), params)
    d_ids, d_probs = d_ids.view(5, 2, 2), d_probs.view(5, 2, 2)
    n, tok = speculative_accept_batch(d_ids[..., 0], d_ids, d_probs, t_p, gen())
    assert n.shape == tok.shape == (5,) and n.dtype == tok.dtype == torch.int64
    assert bool(((n >= 0) & (n <= 2)).all()) and bool(((tok >= 0) & (tok < 7)).all())


def _valid_round():
    ids, probs = sparse([[(2, 0.6), (1, 0.4)], [(0, 0.9), (3, 0.1)]])
    target = torch.full((3, 4), 0.25)
    return [2, 3], ids, probs, target


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d, i, p, t: ([2], i, p, t), "k = 1 rows"),  # k mismatch with sparse rows
        (lambda d, i, p, t: (d, i, p, t[:2]), "k\\+1"),  # target rows != k+1
        (lambda d, i, p, t: (d, i, p[:, :1], t), "shape"),  # ids / probs widths differ
        (lambda d, i, p, t: (d, i.flatten(), p, t), "2-D"),
        (lambda d, i, p, t: (d, i, p, t.flatten()), "2-D"),
        (lambda d, i, p, t: (d, i.float(), p, t), "integer"),
        (lambda d, i, p, t: (d, i, p, t.long()), "floating"),
    ],
)
def test_speculative_accept_malformed_shapes(mutate, match):
    """Shapes and dtypes are programming errors, caught here; the values of a draft's sparse
    distribution are checked once, at the wire boundary (test_protocol)."""
    args = mutate(*_valid_round())
    with pytest.raises(ValueError, match=match):
        speculative_accept(*args, gen())


def test_speculative_accept_valid_round_runs():
    n, tok = speculative_accept(*_valid_round(), gen())
    assert 0 <= n <= 2 and 0 <= tok < 4


# -- residual ------------------------------------------------------------------------------


def test_residual_distribution_normalises_positive_part():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.0, 0.1, 0.2]], dtype=torch.float64)
    assert_close(residual_distribution(p, q), [[0.0, 0.75, 0.25, 0.0]])


def test_residual_distribution_falls_back_to_p_when_p_equals_q():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    q = p + torch.tensor([[RESIDUAL_EPS / 4, -RESIDUAL_EPS / 4, 0.0]], dtype=torch.float64)
    assert_close(residual_distribution(p, p.clone()), [[0.5, 0.3, 0.2]], atol=0)
    assert_close(residual_distribution(p, q), [[0.5, 0.3, 0.2]], atol=0)


def test_densify_sparse():
    dense = densify_sparse(torch.tensor([[3, 0]]), torch.tensor([[0.75, 0.25]]), 5)
    assert_close(dense, [[0.25, 0.0, 0.0, 0.75, 0.0]])
