"""The contract between model math and everything that drives it.

A `ModelRunner` owns one model and the KV cache of many sequences. Callers (the verifier
core, the drafter core, the in-process generator) never touch tensors of the cache; they hand
the runner *new* tokens per sequence and get logits back. KV is soft state: the runner may evict
an idle sequence at any time, after which `cached_len(seq_id)` is 0 and the caller re-sends the
sequence's tokens (a cold prefill). One `forward` call is one forward pass over the whole ragged
batch, whatever mix of cold prefills and warm continuations it holds.

Two implementations share this contract:
- `PagedRunner` (common/models/paged_runner.py): Llama/Qwen2-family forward over a paged KV
  cache, one pass for a heterogeneous batch.
- `HFRunner` (common/models/hf_runner.py): any `transformers` causal LM, one request at a time
  with a `DynamicCache` per sequence; correct but unbatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class KVCacheFull(RuntimeError):
    """The batch cannot fit in the KV budget even after evicting every idle sequence."""


class SequenceTooLong(ValueError):
    """A sequence would exceed the model's maximum position."""


@dataclass(slots=True)
class ForwardItem:
    """New tokens for one sequence, appended after the runner's cached tokens.

    The tokens occupy positions [cached_len(seq_id), cached_len(seq_id) + len(token_ids)).
    """

    seq_id: str
    token_ids: list[int]  # [n_new], n_new >= 1
    # Logits are returned for the last `num_logits` new positions only (saves the LM head on
    # long prefills). 0 means all of them.
    num_logits: int = 0


@runtime_checkable
class ModelRunner(Protocol):
    vocab_size: int
    max_positions: int
    device: torch.device
    dtype: torch.dtype

    def cached_len(self, seq_id: str) -> int:
        """Number of tokens whose KV the runner holds for seq_id (0 if unknown or evicted)."""

    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """One forward pass over the batch; appends every item's KV.

        Returns, per item, float32 logits on CPU of shape [num_logits or n_new, vocab_size]. Raises
        KVCacheFull when the batch cannot fit after evicting idle sequences (those not in `items`),
        SequenceTooLong past max_positions, ValueError for ids outside the vocabulary or an empty
        item. On error nothing is appended.
        """

    def truncate(self, seq_id: str, length: int) -> None:
        """Roll the KV of seq_id back to its first `length` tokens (no-op if already shorter)."""

    def free(self, seq_id: str) -> None:
        """Forget seq_id and release its KV (no-op if unknown)."""

    def evicted(self) -> list[str]:
        """Sequence ids evicted since the last call (drained on read), for metrics and logs."""


def uncached_tail(runner: ModelRunner, seq_id: str, tokens: list[int]) -> tuple[list[int], int]:
    """(the part of `tokens` whose KV the runner does not hold, the cached length it follows).

    Between rounds a runner holds KV for at most tokens[:-1]: the last committed token has
    been sampled but not fed, and its logits are what the caller wants. A KV that already
    covers it means a rollback went wrong, which this raises rather than repairs. Call it right
    before the forward: a sub-batch run just before may have evicted this sequence.
    """
    cached = runner.cached_len(seq_id)
    if cached >= len(tokens):
        raise AssertionError(f"KV invariant broken for {seq_id!r}: the runner holds {cached} "
                             f"tokens of a sequence of {len(tokens)}; at most "
                             f"{len(tokens) - 1} may be cached between rounds")
    return tokens[cached:], cached
