"""Sampling and speculative acceptance (pure torch, no I/O).

Exactness contract:

* ``temperature == 0`` (greedy): the emitted tokens are token-for-token the target's greedy
  output; use :func:`greedy_accept`.
* ``temperature > 0``: the emitted tokens are distributed exactly as if the target sampled
  them itself with temperature / top-k / top-p (:func:`target_probs`).  The draft samples from
  its own *top-m truncated* distribution (:func:`draft_sparse`), so its proposal q is exactly
  the m (id, prob) pairs it sends, and standard speculative sampling stays exact: accept the
  drafted token x with probability ``min(1, p(x) / q(x))``, otherwise emit a token from
  ``norm(max(0, p - q))``; if all k drafts are accepted, emit a bonus token from p at position
  k + 1 (:func:`speculative_accept`).

Every value of :class:`SamplingParams` works exactly, the limits included: a vanishing
temperature or top-p leaves the argmax (ties share), a huge temperature the uniform
distribution; nothing overflows into NaN.

Inputs are trusted: a draft distribution that arrives over the wire was checked once, at the
boundary (``common.protocol.VerifyRequest``: ids unique and within the vocabulary, rows summing
to 1, the drafted token in its row with q > 0). What is checked here is what no boundary can
vouch for: shapes (programming errors) and non-finite logits (a model gone bad), raised as
``ValueError`` so that the caller can fail that one request alone.

Every random draw takes its uniforms from the caller's ``torch.Generator`` (on the generator's
own device, then moved), so a seeded generator reproduces a run whatever device the
probabilities live on.  Sampling is inverse-CDF on float64 cumulative sums rather than
``torch.multinomial``: that is device-agnostic and exactly one uniform per draw.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from common.protocol import SamplingParams

__all__ = [
    "RESIDUAL_EPS",
    "SamplingParams",
    "densify_sparse",
    "draft_sparse",
    "greedy_accept",
    "residual_distribution",
    "sample_probs",
    "sample_sparse",
    "session_seed",
    "speculative_accept",
    "speculative_accept_batch",
    "target_probs",
]

# Below this residual mass, max(0, p - q) is float noise rather than a distribution; see
# residual_distribution for why falling back to p keeps the output exact.
RESIDUAL_EPS = 1e-6

# top-p counts the target mass as reached when it is within this of top_p, so that e.g.
# probs (0.5, 0.3, ...) with top_p = 0.8 keep two tokens despite float rounding in the cumsum.
_TOP_P_TOL = 1e-9


def session_seed(seed: int | None, num_committed: int, prompt_len: int) -> int | None:
    """The generator seed of a session (re)opened with ``num_committed`` tokens.

    At the start of a session it is the session's own seed. A session rebuilt mid-way must not
    restart the seed's stream: its first uniforms already decided the committed rounds, so
    reusing them would correlate new decisions with old ones. It gets a fresh stream derived
    from (seed, committed length) instead, the same on every process. None: no seed was given
    (each process draws a random one).
    """
    if seed is None:
        return None
    if num_committed <= prompt_len:
        return seed
    digest = hashlib.blake2b(f"{seed}:{num_committed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# -- validation helpers ---------------------------------------------------------------------


def _check_tensor(name: str, t: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return t


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_int(name: str, t: Tensor) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps top-p cumsums and acceptance ratios clear of rounding; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _uniforms(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    """U[0, 1) drawn on the generator's device (so seeding is device-independent), then moved."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gen_dtype = torch.float32 if generator.device.type == "mps" else torch.float64
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=gen_dtype)
    return u.to(device=device, dtype=dtype)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """weights [n, N] >= 0 with positive row sums, u [n] in [0, 1) -> [n] int64 column indices.

    Weights need not be normalised: u is scaled by each row's total.
    """
    cdf = weights.cumsum(-1)  # [n, N], non-decreasing because weights >= 0
    target = u.unsqueeze(-1) * cdf[:, -1:]  # [n, 1]
    # right=True returns the first column whose cdf exceeds the target, so a zero-weight
    # column (flat cdf) can never be hit.
    idx = torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(-1)
    # u * total can round up to total when u is within an ulp of 1; clamp to the last
    # positive-weight column instead of running off the end (or onto a zero-weight tail).
    n_cols = weights.shape[-1]
    last_positive = n_cols - 1 - (weights > 0).flip(-1).to(torch.int64).argmax(-1)
    return torch.minimum(idx, last_positive)


# -- target and draft distributions ---------------------------------------------------------


def _probs_from_logits(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """softmax(logits / temperature) per row, for any temperature > 0.

    The row maximum is subtracted *before* dividing, so every scaled logit is <= 0 and none
    can overflow: a vanishing temperature sends the others to -inf (the argmax, ties shared),
    a huge one sends all to 0 (uniform). Dividing first would turn 1e-300 into inf - inf = NaN.
    """
    x = logits.to(dtype)
    top = x.amax(-1, keepdim=True)  # [n, 1]
    probs = torch.softmax((x - top) / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("logits hold NaN or +inf, or a row is entirely -inf")
    return probs


def _check_logits_and_params(logits: Tensor, params: SamplingParams) -> None:
    _check_tensor("logits", logits, 2, "[n, V]")
    _check_float("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [n, V] -> probs [n, V] float32: the target's sampling distribution per row.

    Order matches HF-style warpers: temperature, then top-k (exactly k tokens survive; ties at
    the boundary are broken by torch.topk), then top-p on the renormalised top-k distribution
    (keep the smallest set of most likely tokens whose mass >= top_p; the top token always
    survives).  Greedy params give the one-hot of each row's argmax: the temperature -> 0 limit,
    under which speculative_accept reduces to greedy acceptance.
    """
    _check_logits_and_params(logits, params)
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if params.greedy:
        if bool(torch.isnan(logits).any()):
            raise ValueError("logits hold NaN")
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return out.scatter_(1, logits.argmax(-1, keepdim=True), 1.0)

    vocab = logits.shape[1]
    dtype = _work_dtype(logits.device)
    if 0 < params.top_k < vocab:
        # Only the top_k survivors matter from here on, and topk returns them sorted
        # (descending), which top-p needs: work on [n, top_k] and scatter back at the end.
        vals, ids = logits.topk(params.top_k, dim=-1)  # [n, top_k] each
        probs = _probs_from_logits(vals, params.temperature, dtype)  # [n, top_k]
        probs = _top_p_sorted(probs, params.top_p)
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return out.scatter_(1, ids, probs.to(torch.float32))
    probs = _probs_from_logits(logits, params.temperature, dtype)  # [n, V]
    if params.top_p < 1.0:
        probs = _top_p_dense(probs, params.top_p)
    return probs.to(torch.float32)


def _top_p_dense(probs: Tensor, top_p: float) -> Tensor:
    """probs [n, V] -> [n, V] restricted to each row's top-p nucleus and renormalised.

    The nucleus is usually a few dozen tokens, so rather than sorting the whole vocabulary
    (slow on CPU for V ~ 150k) take the top `width` tokens and widen until their mass reaches
    top_p in every row: then the nucleus lies inside them and the result is the same as with a
    full sort (up to which of exactly tied tokens straddling the cut is kept).
    """
    vocab = probs.shape[-1]
    width = 64
    while width * 16 <= vocab:  # beyond ~V/16 a full sort is as cheap as a wide topk
        sorted_p, order = probs.topk(width, dim=-1)  # [n, width] each, descending
        if bool((sorted_p.sum(-1) >= top_p - _TOP_P_TOL).all()):
            break
        width *= 8
    else:
        # Stable so equal-probability tokens are cut deterministically.
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [n, V] each
    return torch.zeros_like(probs).scatter_(1, order, _top_p_sorted(sorted_p, top_p))


def _top_p_sorted(sorted_p: Tensor, top_p: float) -> Tensor:
    """sorted_p [n, N] rows sorted descending -> the same rows with the tail beyond the
    top-p nucleus zeroed and renormalised."""
    if top_p >= 1.0:
        return sorted_p
    mass_before = sorted_p.cumsum(-1) - sorted_p  # exclusive cumsum; 0 for the top token
    keep = mass_before < top_p - _TOP_P_TOL
    keep[:, 0] = True  # the top token survives any top_p, however small (else 0/0 = NaN)
    kept = sorted_p * keep
    return kept / kept.sum(-1, keepdim=True)


def draft_sparse(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """logits [n, V] -> (ids [n, m] int64, probs [n, m] float32), m = min(draft_top_m, V).

    softmax(logits / temperature) truncated to its m most likely tokens (descending) and
    renormalised: this *is* the draft's proposal distribution q, so sending these m pairs lets
    the verifier evaluate q(x) exactly.  Greedy params give probs (1, 0, ..., 0): the draft
    deterministically proposes its argmax.
    """
    _check_logits_and_params(logits, params)
    m = min(params.draft_top_m, logits.shape[1])
    if params.greedy:
        if bool(torch.isnan(logits).any()):
            raise ValueError("logits hold NaN")
        ids = logits.topk(m, dim=-1).indices  # [n, m], column 0 = argmax
        probs = torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
        probs[:, 0] = 1.0
        return ids.to(torch.int64), probs
    full = _probs_from_logits(logits, params.temperature, _work_dtype(logits.device))  # [n, V]
    top_p, ids = full.topk(m, dim=-1)  # [n, m] each, descending
    probs = top_p / top_p.sum(-1, keepdim=True)
    return ids.to(torch.int64), probs.to(torch.float32)


def densify_sparse(ids: Tensor, probs: Tensor, vocab_size: int) -> Tensor:
    """ids [..., m], probs [..., m] -> dense [..., vocab_size] (probs' dtype); ids must be unique
    per row (they are, coming from draft_sparse)."""
    dense = torch.zeros((*ids.shape[:-1], vocab_size), dtype=probs.dtype, device=probs.device)
    return dense.scatter_(-1, ids.to(device=probs.device, dtype=torch.int64), probs)


# -- sampling -------------------------------------------------------------------------------


def sample_probs(probs: Tensor, generator: torch.Generator) -> Tensor:
    """probs [n, V] (rows sum to 1) -> [n] int64 sampled ids, one uniform per row."""
    _check_tensor("probs", probs, 2, "[n, V]")
    _check_float("probs", probs)
    if probs.shape[1] == 0:
        raise ValueError("probs must have a non-empty vocabulary dimension")
    dtype = _work_dtype(probs.device)
    u = _uniforms((probs.shape[0],), generator, probs.device, dtype)
    return _inverse_cdf(probs.to(dtype), u)


def sample_sparse(ids: Tensor, probs: Tensor, generator: torch.Generator) -> Tensor:
    """ids [n, m], probs [n, m] (rows sum to 1) -> [n] int64: one draw per row from the sparse
    distribution, returned as vocabulary ids."""
    _check_tensor("ids", ids, 2, "[n, m]")
    _check_tensor("probs", probs, 2, "[n, m]")
    _check_int("ids", ids)
    _check_float("probs", probs)
    if ids.shape != probs.shape:
        raise ValueError(
            f"ids and probs must have the same shape [n, m], got {tuple(ids.shape)} and "
            f"{tuple(probs.shape)}")
    if probs.shape[1] == 0:
        raise ValueError("sparse distributions need m >= 1 entries")
    dtype = _work_dtype(probs.device)
    u = _uniforms((probs.shape[0],), generator, probs.device, dtype)
    col = _inverse_cdf(probs.to(dtype), u)  # [n] column within each sparse row
    return ids.to(probs.device).gather(1, col.unsqueeze(1)).squeeze(1).to(torch.int64)


# -- acceptance -----------------------------------------------------------------------------


def greedy_accept(draft_ids: Sequence[int], target_logits: Tensor) -> tuple[int, int]:
    """target_logits [k+1, V]: row i scores the position of draft_ids[i]; row k is the bonus.

    Returns (num_accepted, next_token): the longest prefix with draft_ids[i] == argmax(row i),
    and the target's argmax at the first mismatch (or at row k when all k match).
    """
    ids = _as_id_list(draft_ids)
    k = len(ids)
    _check_tensor("target_logits", target_logits, 2, "[k+1, V]")
    _check_float("target_logits", target_logits)
    if target_logits.shape[0] != k + 1:
        raise ValueError(
            f"target_logits must have k+1 = {k + 1} rows for {k} draft tokens, got "
            f"{target_logits.shape[0]}")
    if target_logits.shape[1] == 0:
        raise ValueError("target_logits must have a non-empty vocabulary dimension")
    if bool(torch.isnan(target_logits).any()):
        raise ValueError("target_logits hold NaN")
    best = target_logits.argmax(-1).tolist()  # [k+1]; one device sync
    for i, t in enumerate(ids):
        if t != best[i]:
            return i, best[i]
    return k, best[k]


def _as_id_list(draft_ids: Sequence[int]) -> list[int]:
    if isinstance(draft_ids, Tensor):
        if draft_ids.dim() != 1:
            raise ValueError(f"draft_ids must be 1-D [k], got shape {tuple(draft_ids.shape)}")
        _check_int("draft_ids", draft_ids)
        return [int(t) for t in draft_ids.tolist()]
    if isinstance(draft_ids, str | bytes) or not isinstance(draft_ids, Sequence):
        raise ValueError(f"draft_ids must be a sequence of ints, got {type(draft_ids).__name__}")
    out = []
    for i, t in enumerate(draft_ids):
        if isinstance(t, bool):
            raise ValueError(f"draft_ids[{i}] must be an int, got bool")
        try:
            out.append(operator.index(t))
        except TypeError:
            raise ValueError(f"draft_ids[{i}] must be an int, got {t!r}") from None
    return out


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """p [n, V], q [n, V] (each row a distribution) -> [n, V]: norm(max(0, p - q)) per row, or
    p itself where the residual mass is <= RESIDUAL_EPS.

    Why the fallback is still exact: a draft token is rejected with probability
    sum_x q(x) (1 - min(1, p(x)/q(x))) = sum_x max(0, q(x) - p(x)) = sum_x max(0, p(x) - q(x)),
    i.e. exactly the residual mass.  A (near-)zero residual therefore means the rejection
    branch is (almost) never taken, and whatever it samples is weighted by that mass in the
    output distribution: with mass 0 (p == q) the choice is irrelevant, and with mass <= eps
    (p == q up to float rounding, the residual being rounding noise that would otherwise be
    amplified by the normalisation) the output is off by at most eps in total variation --
    below the float32 resolution of p itself.  Sampling from p is the natural choice because
    it is the distribution the position must have.
    """
    residual = (p - q).clamp_min(0)  # [n, V]
    mass = residual.sum(-1, keepdim=True)  # [n, 1]
    return torch.where(mass > RESIDUAL_EPS, residual / mass.clamp_min(RESIDUAL_EPS), p)


def speculative_accept(draft_ids: Sequence[int], draft_sparse_ids: Tensor,
                       draft_sparse_probs: Tensor, target_p: Tensor,
                       generator: torch.Generator) -> tuple[int, int]:
    """One speculative-sampling round.

    draft_ids [k]; draft_sparse_ids / draft_sparse_probs [k, m]: the draft's proposal q at
    each drafted position (draft_ids[i] must be among draft_sparse_ids[i] with q > 0);
    target_p [k+1, V] from target_probs (row k is the bonus position).
    Returns (num_accepted, next_token).  Thin wrapper over speculative_accept_batch (B = 1),
    so it consumes the same k+1 uniforms from ``generator``.
    """
    ids = _as_id_list(draft_ids)
    k = len(ids)
    _check_tensor("draft_sparse_ids", draft_sparse_ids, 2, "[k, m]")
    _check_tensor("draft_sparse_probs", draft_sparse_probs, 2, "[k, m]")
    _check_tensor("target_p", target_p, 2, "[k+1, V]")
    # Shape errors are reported here in unbatched terms; the batch call re-checks the rest.
    if draft_sparse_ids.shape[0] != k:
        raise ValueError(
            f"draft_sparse_ids must have k = {k} rows (one per draft token), got shape "
            f"{tuple(draft_sparse_ids.shape)}")
    if draft_sparse_probs.shape != draft_sparse_ids.shape:
        raise ValueError(
            f"draft_sparse_probs must have draft_sparse_ids' shape {tuple(draft_sparse_ids.shape)}"
            f", got {tuple(draft_sparse_probs.shape)}")
    if target_p.shape[0] != k + 1:
        raise ValueError(
            f"target_p must have k+1 = {k + 1} rows for {k} draft tokens, got shape "
            f"{tuple(target_p.shape)}")
    draft = torch.tensor([ids], dtype=torch.int64, device=target_p.device).reshape(1, k)
    n, tok = speculative_accept_batch(draft, draft_sparse_ids.unsqueeze(0),
                                      draft_sparse_probs.unsqueeze(0), target_p.unsqueeze(0),
                                      generator)
    return int(n[0]), int(tok[0])


def speculative_accept_batch(draft_ids: Tensor, draft_sparse_ids: Tensor,
                             draft_sparse_probs: Tensor, target_p: Tensor,
                             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """B independent speculative-sampling rounds with the same k, vectorised.

    draft_ids [B, k]; draft_sparse_ids / draft_sparse_probs [B, k, m]; target_p [B, k+1, V].
    Returns (num_accepted [B] int64, next_token [B] int64) on target_p's device.

    Draws a [B, k+1] block of uniforms: column i < k decides acceptance at position i, column k
    samples the final token (residual or bonus).  Uniforms past the first rejection go unused;
    they are independent of everything used, so drawing them up front costs no exactness.

    Trusted inputs (see the module docstring): each sparse row holds unique ids within the
    vocabulary, sums to 1, and gives its drafted id a probability > 0; target_p rows are
    distributions (target_probs makes them).
    """
    _check_tensor("draft_ids", draft_ids, 2, "[B, k]")
    _check_tensor("draft_sparse_ids", draft_sparse_ids, 3, "[B, k, m]")
    _check_tensor("draft_sparse_probs", draft_sparse_probs, 3, "[B, k, m]")
    _check_tensor("target_p", target_p, 3, "[B, k+1, V]")
    _check_int("draft_ids", draft_ids)
    _check_int("draft_sparse_ids", draft_sparse_ids)
    _check_float("draft_sparse_probs", draft_sparse_probs)
    _check_float("target_p", target_p)
    batch, k = draft_ids.shape
    if draft_sparse_ids.shape[:2] != (batch, k):
        raise ValueError(
            f"draft_sparse_ids must be [B, k, m] = [{batch}, {k}, m] to match draft_ids, got "
            f"{tuple(draft_sparse_ids.shape)}")
    if draft_sparse_probs.shape != draft_sparse_ids.shape:
        raise ValueError(
            f"draft_sparse_probs must have draft_sparse_ids' shape {tuple(draft_sparse_ids.shape)}"
            f", got {tuple(draft_sparse_probs.shape)}")
    if target_p.shape[:2] != (batch, k + 1):
        raise ValueError(
            f"target_p must be [B, k+1, V] = [{batch}, {k + 1}, V] for {k} draft tokens, got "
            f"{tuple(target_p.shape)}")
    vocab, m = target_p.shape[2], draft_sparse_ids.shape[2]
    if vocab == 0:
        raise ValueError("target_p must have a non-empty vocabulary dimension")
    if k > 0 and m == 0:
        raise ValueError("sparse draft distributions need m >= 1 entries")

    device = target_p.device
    draft = draft_ids.to(device=device, dtype=torch.int64)  # [B, k]
    sp_ids = draft_sparse_ids.to(device=device, dtype=torch.int64)  # [B, k, m]
    sp_probs = draft_sparse_probs.to(device)  # [B, k, m]
    dtype = _work_dtype(device)
    p_sums = target_p.sum(-1, dtype=dtype)  # [B, k+1]
    q_sums = sp_probs.sum(-1, dtype=dtype)  # [B, k]
    # Renormalise in the work dtype so acceptance ratios and residuals see exact
    # distributions.  p is only ever read at a few entries plus one row per batch item, so it
    # is divided lazily there rather than copied whole into the work dtype.
    q = sp_probs.to(dtype) / q_sums.unsqueeze(-1)  # [B, k, m]

    match = sp_ids == draft.unsqueeze(-1)  # [B, k, m]: where each drafted id sits in its row
    qx = (q * match).sum(-1)  # [B, k]: q(x_i) > 0 (checked at the boundary)
    px = target_p[:, :k].gather(-1, draft.unsqueeze(-1)).squeeze(-1).to(dtype)
    px = px / p_sums[:, :k]  # [B, k]: p(x_i)

    u = _uniforms((batch, k + 1), generator, device, dtype)  # [B, k+1]
    # u < min(1, p/q)  <=>  u * q < p  (q > 0): no division, and p >= q always accepts.
    accept = u[:, :k] * qx < px  # [B, k]
    num_accepted = accept.to(torch.int64).cumprod(-1).sum(-1)  # [B]: length of accepted prefix

    # Final token: from norm(max(0, p - q)) at the first rejected position, or from p at the
    # bonus position k when all were accepted (q := 0 there makes the residual p itself).
    at_n = num_accepted.view(batch, 1)  # [B, 1]
    p_row = target_p.gather(1, at_n.unsqueeze(-1).expand(batch, 1, vocab)).squeeze(1)
    p_row = p_row.to(dtype) / p_sums.gather(1, at_n)  # [B, V]
    if k > 0:
        row = num_accepted.clamp(max=k - 1).view(batch, 1, 1).expand(batch, 1, m)
        q_row_ids = sp_ids.gather(1, row).squeeze(1)  # [B, m]
        q_row_probs = q.gather(1, row).squeeze(1) * (num_accepted < k).unsqueeze(-1)  # [B, m]
        q_row = densify_sparse(q_row_ids, q_row_probs, vocab)  # [B, V]
        final = residual_distribution(p_row, q_row)  # [B, V]
    else:
        final = p_row
    next_token = _inverse_cdf(final, u[:, k])  # [B]
    return num_accepted, next_token
