"""`HFRunner`: the `ModelRunner` for any transformers causal LM, one sequence at a time.

Each sequence keeps its own `DynamicCache`; `forward` runs the model once per item. Correct for
every architecture transformers supports, but unbatched: the fallback when `PagedRunner` cannot
run a model, and the reference it is tested against.
"""

from __future__ import annotations

import inspect
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.models.paged_runner import validate_items
from common.models.runner import ForwardItem, KVCacheFull


@dataclass(slots=True)
class _Sequence:
    cache: DynamicCache
    length: int = 0


class HFRunner:
    """Runs `model` with a `DynamicCache` per sequence; holds at most `max_sequences` (LRU).

    Like PagedRunner, `forward` runs under `torch.inference_mode()` (returned logits are
    inference tensors: clone before modifying them in place).
    """

    def __init__(self, model, max_sequences: int | None = None) -> None:
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self.model = model
        self.max_sequences = max_sequences
        config = model.config.get_text_config(decoder=True)
        self._config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", None) or sys.maxsize)
        first_param = next(model.parameters())
        self.device = first_param.device
        self.dtype = first_param.dtype
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._seqs: OrderedDict[str, _Sequence] = OrderedDict()  # least recently used first
        self._evicted: list[str] = []

    def cached_len(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.length

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        if not items:
            return []
        starts = [self.cached_len(it.seq_id) for it in items]
        validate_items(items, self.vocab_size, starts, self.max_positions)
        self._make_room(items)

        results: list[torch.Tensor] = []
        done: list[tuple[str, int]] = []  # (seq_id, length before this batch) of finished items
        for item, start in zip(items, starts, strict=True):
            try:
                results.append(self._run_one(item))
            except BaseException:
                # The failing item's cache may be updated in some layers only, so it cannot be
                # cropped back: drop it (an eviction if it held tokens). Finished items are
                # rolled back to where they were.
                if start == 0:
                    self.free(item.seq_id)
                else:
                    self._drop(item.seq_id)
                for seq_id, length in done:
                    if length == 0:
                        self.free(seq_id)
                    else:
                        self.truncate(seq_id, length)
                raise
            done.append((item.seq_id, start))
        return results

    def truncate(self, seq_id: str, length: int) -> None:
        seq = self._seqs.get(seq_id)
        if seq is None or length >= seq.length:
            return
        if length <= 0:
            seq.cache, seq.length = self._new_cache(), 0
            return
        try:
            # A negative argument removes that many tokens (transformers 4.x and 5.x alike; 5.x
            # rejects positive ones).
            seq.cache.crop(length - seq.length)
            seq.length = length
        except (RuntimeError, ValueError):
            # Caches that cannot roll back (e.g. a full sliding window without past recording):
            # treat as an eviction; the caller re-prefills.
            self._drop(seq_id)

    def free(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def evicted(self) -> list[str]:
        out, self._evicted = self._evicted, []
        return out

    def _run_one(self, item: ForwardItem) -> torch.Tensor:
        seq = self._seqs.get(item.seq_id)
        if seq is None:
            seq = self._seqs[item.seq_id] = _Sequence(self._new_cache())
        self._seqs.move_to_end(item.seq_id)
        n = len(item.token_ids)
        keep = item.num_logits or n
        kwargs = {"logits_to_keep": keep} if self._has_logits_to_keep else {}
        ids = torch.tensor([item.token_ids], dtype=torch.int64, device=self.device)  # [1, n]
        out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True, **kwargs)
        seq.cache = out.past_key_values
        seq.length += n
        return out.logits[0, -keep:].float().cpu()  # [keep, vocab]

    def _make_room(self, items: list[ForwardItem]) -> None:
        """Evict LRU sequences outside the batch so the batch's new sequences fit."""
        if self.max_sequences is None:
            return
        in_batch = {it.seq_id for it in items}
        if len(in_batch) > self.max_sequences:
            raise KVCacheFull(f"batch has {len(in_batch)} sequences, max is {self.max_sequences}")
        new = sum(1 for s in in_batch if s not in self._seqs)
        excess = len(self._seqs) + new - self.max_sequences
        for seq_id in [s for s in self._seqs if s not in in_batch][: max(0, excess)]:
            self._drop(seq_id)

    def _drop(self, seq_id: str) -> None:
        if self._seqs.pop(seq_id, None) is not None:
            self._evicted.append(seq_id)

    def _new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self._config)
        except TypeError:  # transformers < 4.56 has no config argument
            return DynamicCache()
