"""Statistical exactness of speculative sampling (common.sampling).

A toy order-1 autoregressive "language model" over V = 6 tokens: the target's logits for the
next token are a lookup table indexed by the previous token (row START for the first token),
and the draft has its own, different table.  The draft proposes from its top-m truncated
distribution with m = 3 < V, so half of the vocabulary is never drafted at a given position
and can only be emitted through the rejection residual or the bonus token.

Many independent generations run side by side (vectorised over the batch with
speculative_accept_batch; speculative_accept is its B = 1 wrapper, and a smaller test drives
the public per-round function directly).  A chi-square goodness-of-fit test then compares
emitted tokens with the target's own sampling distribution: for the first token, and for the
joint of the first L tokens across round boundaries (accepted drafts, residual tokens and
bonus tokens all contribute).  Seeds are fixed, so each test is deterministic.

Negative controls run the same check on deliberately wrong acceptance rules and require it to
reject them, so the check demonstrably has the power to fail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from scipy.stats import chisquare

from common.sampling import (
    SamplingParams,
    draft_sparse,
    sample_probs,
    sample_sparse,
    speculative_accept,
    speculative_accept_batch,
    target_probs,
)

V = 6
START = V  # context row for the first token
M = 3  # draft_top_m < V
N_SAMPLES = 30_000
P_MIN = 1e-3  # exact rules must pass at this level ...
P_REJECT = 1e-8  # ... and wrong rules must fail far below it

AcceptFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                    tuple[torch.Tensor, torch.Tensor]]

TARGET_PARAMS = [
    pytest.param(SamplingParams(temperature=1.0, draft_top_m=M), id="plain"),
    pytest.param(SamplingParams(temperature=0.6, draft_top_m=M), id="temperature"),
    pytest.param(SamplingParams(temperature=1.3, top_k=4, draft_top_m=M), id="top_k"),
    pytest.param(SamplingParams(temperature=1.0, top_p=0.8, draft_top_m=M), id="top_p"),
    pytest.param(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, draft_top_m=M),
                 id="top_k+top_p"),
]


class Model:
    """Target probability table and the draft's sparse tables, one row per context."""

    def __init__(self, params: SamplingParams, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        target_logits = torch.randn(V + 1, V, generator=g) * 1.3  # [V+1, V]
        # related to the target (so acceptance is common) but clearly different
        draft_logits = 0.6 * target_logits + torch.randn(V + 1, V, generator=g)  # [V+1, V]
        self.p = target_probs(target_logits, params)  # [V+1, V]
        draft_params = SamplingParams(temperature=1.0, draft_top_m=M)
        self.q_ids, self.q_probs = draft_sparse(draft_logits, draft_params)  # [V+1, M] each

    def chain_probs(self, length: int) -> torch.Tensor:
        """[V ** length] float64: the target's probability of every token sequence, in
        base-V order (first token most significant)."""
        probs = self.p[START].double()  # [V]
        trans = self.p[:V].double()  # [V, V]: previous token -> next token
        for _ in range(length - 1):
            last = torch.arange(probs.numel()) % V  # last token of each prefix
            probs = (probs.unsqueeze(1) * trans[last]).reshape(-1)
        return probs


def draft_round(model: Model, ctx: torch.Tensor, k: int, g: torch.Generator):
    """ctx [B] -> draft ids [B, k], sparse ids / probs [B, k, M], target_p [B, k+1, V]."""
    drafts, sp_ids, sp_probs, contexts = [], [], [], [ctx]
    cur = ctx
    for _ in range(k):
        ids, probs = model.q_ids[cur], model.q_probs[cur]  # [B, M]
        cur = sample_sparse(ids, probs, g)  # [B]
        drafts.append(cur)
        sp_ids.append(ids)
        sp_probs.append(probs)
        contexts.append(cur)
    b = ctx.numel()
    draft = torch.stack(drafts, 1) if k else torch.zeros(b, 0, dtype=torch.int64)
    ids = torch.stack(sp_ids, 1) if k else torch.zeros(b, 0, M, dtype=torch.int64)
    probs = torch.stack(sp_probs, 1) if k else torch.zeros(b, 0, M)
    target_p = model.p[torch.stack(contexts, 1)]  # [B, k+1, V]
    return draft, ids, probs, target_p


def generate(model: Model, accept: AcceptFn, k: int, length: int, n: int, seed: int,
             stats: dict | None = None) -> torch.Tensor:
    """Run n independent generations, as many speculative rounds as each needs to emit
    `length` tokens.  Returns [n, length] int64."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, length), -1, dtype=torch.int64)
    produced = torch.zeros(n, dtype=torch.int64)
    ctx = torch.full((n,), START, dtype=torch.int64)
    while bool((produced < length).any()):
        active = (produced < length).nonzero().squeeze(1)
        draft, ids, probs, target_p = draft_round(model, ctx[active], k, g)
        num_acc, tok = accept(draft, ids, probs, target_p, g)
        if stats is not None:
            stats.setdefault("num_accepted", []).append(num_acc)
        # A round emits draft[:num_acc] followed by tok.
        padded = torch.cat([draft, tok.unsqueeze(1)], 1)  # [b, k+1]
        emitted = torch.where(torch.arange(k + 1) < num_acc.unsqueeze(1), padded,
                              tok.unsqueeze(1))  # [b, k+1]; first num_acc+1 valid
        base = produced[active]
        for j in range(k + 1):
            ok = (j <= num_acc) & (base + j < length)
            out[active[ok], base[ok] + j] = emitted[ok, j]
        produced[active] = (base + num_acc + 1).clamp(max=length)
        ctx[active] = tok  # the last emitted token is the next round's context
    return out


def chisquare_pvalue(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """samples [N] cell indices, expected [C] probabilities -> goodness-of-fit p-value.

    Cells the target gives probability 0 must never occur (that would be an exactness bug,
    not noise).  Cells with an expected count below 5 are pooled so the chi-square
    approximation holds.
    """
    counts = torch.bincount(samples, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "emitted a token sequence the target never produces"
    obs, exp = counts[support], expected[support].double()
    exp = exp / exp.sum() * counts.sum()
    small = exp < 5
    if bool(small.any()):
        obs = torch.cat([obs[~small], obs[small].sum().view(1)])
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
    assert obs.numel() >= 2, "degenerate distribution: nothing to test"
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def encode(seqs: torch.Tensor) -> torch.Tensor:
    """[N, L] tokens -> [N] base-V cell index (first token most significant)."""
    code = torch.zeros(seqs.shape[0], dtype=torch.int64)
    for j in range(seqs.shape[1]):
        code = code * V + seqs[:, j]
    return code


# -- deliberately wrong acceptance rules (negative controls) ---------------------------------


def always_accept(draft, ids, probs, target_p, g):
    """Accept every draft token and take a bonus from p: emits the draft's distribution."""
    k = draft.shape[1]
    return torch.full((draft.shape[0],), k, dtype=torch.int64), sample_probs(target_p[:, k], g)


def resample_from_target(draft, ids, probs, target_p, g):
    """Correct acceptance test, but on rejection sample from p instead of norm(max(0, p - q)):
    over-weights tokens the draft already had its chance to propose."""
    num_acc, tok = speculative_accept_batch(draft, ids, probs, target_p, g)
    rows = target_p[torch.arange(draft.shape[0]), num_acc]  # [B, V]
    return num_acc, torch.where(num_acc < draft.shape[1], sample_probs(rows, g), tok)


def ignore_truncation(draft_ids, draft_sparse_ids, draft_sparse_probs, target_p, g):
    """Acceptance ratio uses the draft's *untruncated* q (top-m mass not renormalised), i.e. a
    verifier that forgot the draft samples from its top-m distribution."""
    raw = draft_sparse_probs * UNTRUNCATED_MASS[draft_sparse_probs.shape[-1]]
    return _reference_accept(draft_ids, draft_sparse_ids, raw, target_p, g)


UNTRUNCATED_MASS = {M: 0.8}  # pretend the top-m held 80% of the draft's mass


def _reference_accept(draft, ids, probs, target_p, g):
    """Plain re-statement of speculative sampling without input checks, so a negative control
    can feed it a q that does not sum to 1."""
    b, k = draft.shape
    p = target_p.double()
    q = probs.double()
    qx = (q * (ids == draft.unsqueeze(-1))).sum(-1)  # [B, k]
    px = p[:, :k].gather(-1, draft.unsqueeze(-1)).squeeze(-1)  # [B, k]
    u = torch.rand(b, k, generator=g, dtype=torch.float64)
    num_acc = (u * qx < px).long().cumprod(-1).sum(-1)  # [B]
    rows = p[torch.arange(b), num_acc]  # [B, V]
    q_dense = torch.zeros(b, k, V, dtype=torch.float64).scatter_(-1, ids, q)
    q_row = q_dense[torch.arange(b), num_acc.clamp(max=k - 1)] * (num_acc < k).unsqueeze(-1)
    residual = (rows - q_row).clamp_min(0)  # [B, V]
    mass = residual.sum(-1, keepdim=True)
    final = torch.where(mass > 1e-12, residual / mass.clamp_min(1e-12), rows)
    return num_acc, sample_probs(final, g)


# -- tests -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _single_thread():
    """The tensors here are small (~10^5 elements); intra-op threading only adds OpenMP
    hand-off cost, which balloons when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.mark.parametrize("params", TARGET_PARAMS)
def test_first_token_matches_target(params):
    model = Model(params)
    stats: dict = {}
    seqs = generate(model, speculative_accept_batch, k=3, length=1, n=N_SAMPLES, seed=11,
                    stats=stats)
    assert chisquare_pvalue(seqs[:, 0], model.p[START]) > P_MIN

    # The run must exercise every path, or the test would prove little.
    num_acc = torch.cat(stats["num_accepted"])
    assert bool((num_acc == 0).any()) and bool((num_acc == 3).any())
    assert bool(((num_acc > 0) & (num_acc < 3)).any())
    never_drafted = set(range(V)) - set(model.q_ids[START].tolist())
    emitted = set(seqs[:, 0].tolist())
    reachable = {t for t in never_drafted if float(model.p[START, t]) > 1e-3}
    assert reachable and reachable <= emitted  # tokens outside the draft's top-m come out


@pytest.mark.parametrize("params", TARGET_PARAMS)
@pytest.mark.parametrize(("k", "length"), [(2, 3), (4, 2)])
def test_joint_sequence_matches_target_chain(params, k, length):
    """The first `length` emitted tokens, across round boundaries, follow the target's chain
    p(t0 | START) p(t1 | t0) ...: accepted drafts, residual tokens and bonus tokens alike."""
    model = Model(params)
    if params.top_k or params.top_p < 1:
        assert bool((model.p == 0).any())  # the filters really remove tokens somewhere
    seqs = generate(model, speculative_accept_batch, k=k, length=length, n=N_SAMPLES,
                    seed=100 + k)
    assert chisquare_pvalue(encode(seqs), model.chain_probs(length)) > P_MIN


def test_greedy_target_gives_the_greedy_chain():
    """Temperature 0 on the target side (one-hot target_probs), sampled drafts: every
    generation must be exactly the target's greedy chain."""
    model = Model(SamplingParams(temperature=0.0, draft_top_m=M))
    chain, ctx = [], START
    for _ in range(4):
        ctx = int(model.p[ctx].argmax())
        chain.append(ctx)
    stats: dict = {}
    seqs = generate(model, speculative_accept_batch, k=3, length=4, n=2000, seed=9,
                    stats=stats)
    assert bool((seqs == torch.tensor(chain)).all())
    num_acc = torch.cat(stats["num_accepted"])
    assert bool((num_acc < 3).any()) and bool((num_acc > 0).any())  # rejections happened


def test_public_per_round_function_matches_target():
    """Drive speculative_accept (the per-round API the verifier calls) in a Python loop."""
    params = SamplingParams(temperature=1.0, top_k=5, draft_top_m=M)
    model = Model(params, seed=7)
    g = torch.Generator().manual_seed(3)
    n, k = 3000, 2
    draft, ids, probs, target_p = draft_round(model, torch.full((n,), START), k, g)
    firsts, seconds = [], []
    for b in range(n):
        num_acc, tok = speculative_accept(draft[b].tolist(), ids[b], probs[b], target_p[b], g)
        firsts.append(int(draft[b, 0]) if num_acc > 0 else tok)
        if num_acc >= 1:  # second token of this round, given the first was an accepted draft
            seconds.append((int(draft[b, 0]), int(draft[b, 1]) if num_acc > 1 else tok))
    assert chisquare_pvalue(torch.tensor(firsts), model.p[START]) > P_MIN
    # Given an accepted first draft x0, the next emitted token is distributed p(. | x0).
    by_first: dict[int, list[int]] = {}
    for t0, t1 in seconds:
        by_first.setdefault(t0, []).append(t1)
    t0, t1s = max(by_first.items(), key=lambda item: len(item[1]))
    assert len(t1s) > 500
    assert chisquare_pvalue(torch.tensor(t1s), model.p[t0]) > P_MIN


def test_reference_rule_passes_the_same_check():
    """The negative controls below rely on _reference_accept; with the correct q it must
    pass, so their failures come from the injected bug alone."""
    params = SamplingParams(temperature=1.0, draft_top_m=M)
    model = Model(params)
    seqs = generate(model, _reference_accept, k=2, length=3, n=N_SAMPLES, seed=5)
    assert chisquare_pvalue(encode(seqs), model.chain_probs(3)) > P_MIN


@pytest.mark.parametrize(
    "wrong_rule", [always_accept, resample_from_target, ignore_truncation],
    ids=["always_accept", "resample_from_target", "ignore_truncation"])
def test_negative_control_wrong_rules_are_rejected(wrong_rule):
    params = SamplingParams(temperature=1.0, draft_top_m=M)
    model = Model(params)
    seqs = generate(model, wrong_rule, k=2, length=3, n=N_SAMPLES, seed=5)
    expected = model.chain_probs(3)
    try:
        pvalue = chisquare_pvalue(encode(seqs), expected)
    except AssertionError:  # emitted impossible sequences: also a detected failure
        return
    assert pvalue < P_REJECT, f"wrong rule {wrong_rule.__name__} passed (p = {pvalue:.3g})"
