"""The shipped tiny model pair and its held-out prompts, loaded once per test process."""

from __future__ import annotations

import functools
import json

from common.models.loading import DEFAULT_MODELS_DIR, LoadedModel, load_pair

MAX_NEW = 32  # new tokens per exactness case: enough for several rounds at k_max 8


@functools.cache
def shipped_pair() -> tuple[LoadedModel, LoadedModel]:
    return load_pair(device="cpu", dtype="float32")


def held_out_prompts(tokenizer, per_domain: int = 12, max_tokens: int = 128) -> list[list[int]]:
    """Token ids of held-out code and prose prompts (never seen in training)."""
    data = json.loads((DEFAULT_MODELS_DIR / "eval_prompts.json").read_text())
    prompts = []
    for domain in ("code", "prose"):
        for text in data[domain][:per_domain]:
            prompts.append(tokenizer.encode(text, add_special_tokens=False)[-max_tokens:])
    return prompts
