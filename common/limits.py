"""The checks that need a model's numbers, made once where a request enters a service.

`common.protocol` checks what a payload is; these check whether a model can take it: token ids
within the vocabulary, a prompt within the prompt limit, prompt + output + k_max within the
context, a draft within k_max, and the same vocabulary on both sides of a session. The
scheduler applies them at session open against the verifier it picks (whose limits arrive in
its heartbeats), the edge before it opens a session, the verifier to every batch entry; the
cores behind them trust their inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import ErrorCode, WispError
from common.protocol import ModelLimits, SessionSpec, VerifyRequest, VocabInfo

__all__ = ["check_draft", "check_ids", "check_open", "check_prompt", "max_prompt_bytes",
           "mismatch"]


def check_ids(ids: Iterable[int], vocab_size: int, what: str) -> None:
    """OUT_OF_VOCABULARY unless every id is in [0, vocab_size) (the wire already made them
    non-negative ints)."""
    bad = [t for t in ids if t >= vocab_size]
    if bad:
        raise WispError(ErrorCode.OUT_OF_VOCABULARY,
                        f"{what} holds {len(bad)} token ids outside [0, {vocab_size}), "
                        f"e.g. {bad[0]}")


def check_prompt(prompt_ids: list[int], limits: ModelLimits) -> None:
    if not prompt_ids:
        raise WispError(ErrorCode.BAD_REQUEST, "the prompt encodes to no tokens")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise WispError(ErrorCode.PROMPT_TOO_LONG,
                        f"prompt has {len(prompt_ids)} tokens; the limit is "
                        f"{limits.max_prompt_tokens}")
    check_ids(prompt_ids, limits.vocab.size, "prompt")


def mismatch(spec: SessionSpec, prompt_len: int, vocab: VocabInfo | None,
             limits: ModelLimits, where: str = "the verifier") -> WispError | None:
    """Why a model with `limits` cannot serve this session (None: it can). The error names
    what disagrees. `vocab` None: the session's vocabulary is not known (not compared)."""
    if vocab is not None and vocab != limits.vocab:
        return WispError(ErrorCode.VOCABULARY_MISMATCH,
                         f"the session's vocabulary (size {vocab.size}, digest {vocab.digest}) "
                         f"is not that of {where} (size {limits.vocab.size}, digest "
                         f"{limits.vocab.digest}): draft and target must share one tokenizer")
    if spec.k_max > limits.k_max:
        return WispError(ErrorCode.DRAFT_TOO_LONG,
                         f"k_max {spec.k_max} exceeds the k_max of {where} ({limits.k_max})")
    if prompt_len > limits.max_prompt_tokens:
        return WispError(ErrorCode.PROMPT_TOO_LONG,
                         f"prompt has {prompt_len} tokens; the limit of {where} is "
                         f"{limits.max_prompt_tokens}")
    total = prompt_len + spec.max_new_tokens + spec.k_max
    if total > limits.max_context:
        return WispError(ErrorCode.SEQUENCE_TOO_LONG,
                         f"prompt ({prompt_len}) + max_new_tokens ({spec.max_new_tokens}) "
                         f"+ k_max ({spec.k_max}) = {total} exceeds the context of {where} "
                         f"({limits.max_context} tokens)")
    return None


def check_open(spec: SessionSpec, prompt_ids: list[int], vocab: VocabInfo,
               limits: ModelLimits, where: str = "the verifier") -> None:
    """Can a model with `limits` serve this session? Raises the first disagreement."""
    err = mismatch(spec, len(prompt_ids), vocab, limits, where)
    if err is not None:
        raise err
    check_prompt(prompt_ids, limits)


def check_draft(request: VerifyRequest, k_max: int, vocab_size: int) -> None:
    """A round's draft against the session's k_max and the model's vocabulary."""
    k = len(request.draft_ids)
    if k > k_max:
        raise WispError(ErrorCode.DRAFT_TOO_LONG, f"draft has {k} tokens; k_max is {k_max}")
    check_ids(request.draft_ids, vocab_size, "draft")
    for row in request.draft_sparse_ids or ():
        check_ids(row, vocab_size, "sparse draft distribution")


def max_prompt_bytes(max_prompt_tokens: int, longest_token_bytes: int) -> int:
    """A text prompt longer than this (UTF-8 bytes) cannot tokenize into max_prompt_tokens
    tokens, so it can be refused before any tokenizer work."""
    return max(1, max_prompt_tokens * max(1, longest_token_bytes))
