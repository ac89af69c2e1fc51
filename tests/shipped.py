"""The shipped tiny model pair and its held-out prompts, loaded once per test process."""

from __future__ import annotations

import functools

from common.models import loading

MAX_NEW = 32  # new tokens per exactness case: enough for several rounds at k_max 8


@functools.cache
def shipped_pair() -> tuple[loading.LoadedModel, loading.LoadedModel]:
    return loading.load_pair(device="cpu", dtype="float32")


def greedy_cases(per_domain: int = 12, max_new: int = MAX_NEW,
                 max_tokens: int = 128) -> tuple[list[list[int]], list[list[int]]]:
    """Held-out prompts and, for each, the target's own greedy output: the references every
    exactness test compares with."""
    from common.models.reference import hf_greedy

    _, target = shipped_pair()
    prompts = held_out_prompts(target.tokenizer, per_domain, max_tokens)
    return prompts, [hf_greedy(target.model, p, max_new, target.eos_token_id) for p in prompts]


def held_out_prompts(tokenizer, per_domain: int = 12, max_tokens: int = 128) -> list[list[int]]:
    """Held-out code prompts, then held-out prose prompts (never seen in training)."""
    by_domain = loading.held_out_prompts(tokenizer, per_domain, max_tokens)
    return by_domain["code"] + by_domain["prose"]
