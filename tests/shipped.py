"""The shipped tiny model pair and its held-out prompts, loaded once per test process."""

from __future__ import annotations

import functools

from common.models import loading

MAX_NEW = 32  # new tokens per exactness case: enough for several rounds at k_max 8


@functools.cache
def shipped_pair() -> tuple[loading.LoadedModel, loading.LoadedModel]:
    return loading.load_pair(device="cpu", dtype="float32")


def held_out_prompts(tokenizer, per_domain: int = 12, max_tokens: int = 128) -> list[list[int]]:
    """Held-out code prompts, then held-out prose prompts (never seen in training)."""
    by_domain = loading.held_out_prompts(tokenizer, per_domain, max_tokens)
    return by_domain["code"] + by_domain["prose"]
