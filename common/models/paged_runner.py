"""`PagedRunner`: the `ModelRunner` for Llama/Qwen2-family models over a paged KV cache.

One `forward` is one pass of `PagedLlama` over the whole ragged batch. Blocks for the batch are
reserved up front (evicting least-recently-used sequences outside the batch when the pool runs
short), so a batch either runs completely or changes nothing.
"""

from __future__ import annotations

import torch

from common.models.paged_cache import BlockManager, num_blocks_for_budget
from common.models.paged_llama import PagedLlama, RaggedBatch, unsupported_reason
from common.models.runner import ForwardItem, KVCacheFull, SequenceTooLong

# Zero-filled up front (masked padding must never read NaN garbage), so keep the default
# modest; servers size it from free device memory.
DEFAULT_KV_BUDGET_BYTES = 256 << 20


def validate_items(
    items: list[ForwardItem], vocab_size: int, starts: list[int], max_positions: int
) -> None:
    """The checks both runners make before touching any state.

    ValueError for an empty item, an id outside [0, vocab_size), a repeated seq_id or a
    num_logits outside [0, n_new]; SequenceTooLong when an item's cached length (`starts`) plus
    its new tokens exceeds max_positions.
    """
    seen: set[str] = set()
    for item in items:
        if item.seq_id in seen:
            raise ValueError(f"seq_id {item.seq_id!r} appears twice in one batch")
        seen.add(item.seq_id)
        n = len(item.token_ids)
        if n == 0:
            raise ValueError(f"item {item.seq_id!r} has no tokens")
        if not 0 <= item.num_logits <= n:
            raise ValueError(f"item {item.seq_id!r}: num_logits {item.num_logits} not in [0, {n}]")
        if min(item.token_ids) < 0 or max(item.token_ids) >= vocab_size:
            bad = [t for t in item.token_ids if not 0 <= t < vocab_size]
            raise ValueError(f"item {item.seq_id!r}: token ids {bad[:5]} outside [0, {vocab_size})")
    for item, start in zip(items, starts, strict=True):
        if start + len(item.token_ids) > max_positions:
            raise SequenceTooLong(
                f"{item.seq_id!r}: {start} cached + {len(item.token_ids)} new tokens "
                f"> max_positions {max_positions}"
            )


class PagedRunner:
    """Batched Llama/Qwen2 runner; KV lives in `num_blocks` blocks of `block_size` tokens.

    The pool size comes from `num_blocks` if given, else from `kv_budget_bytes` (default 256 MiB).
    Build the runner after moving the model to its device and dtype: it keeps references to the
    weight tensors as they are then.

    `forward` runs under `torch.inference_mode()`, so the logits it returns are inference
    tensors: out-of-place ops on them work anywhere, in-place ones need a `.clone()` first.
    """

    def __init__(
        self,
        model,
        kv_budget_bytes: int | None = None,
        num_blocks: int | None = None,
        block_size: int = 16,
    ) -> None:
        self.model = PagedLlama(model)
        m = self.model
        if num_blocks is None:
            budget = DEFAULT_KV_BUDGET_BYTES if kv_budget_bytes is None else kv_budget_bytes
            num_blocks = num_blocks_for_budget(
                budget, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, block_size
            )
            if num_blocks < 1:
                raise ValueError(f"kv_budget_bytes={budget} is less than one block")
        self.blocks = BlockManager(num_blocks, block_size)
        self.cache = m.new_cache(num_blocks, block_size)
        self.vocab_size = m.vocab_size
        self.max_positions = int(model.config.max_position_embeddings)
        self.device = m.device
        self.dtype = m.dtype
        self._evicted: list[str] = []

    @staticmethod
    def supports(model) -> bool:
        """Llama/Qwen2 with SiLU MLP, full attention in every layer and a static RoPE."""
        return unsupported_reason(model) is None

    def cached_len(self, seq_id: str) -> int:
        return self.blocks.seq_len(seq_id)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        if not items:
            return []
        starts = [self.blocks.seq_len(it.seq_id) for it in items]
        validate_items(items, self.vocab_size, starts, self.max_positions)
        self._reserve(items)

        try:
            num_logits = [it.num_logits or len(it.token_ids) for it in items]
            batch = RaggedBatch.build(
                self.cache,
                [it.token_ids for it in items],
                starts,
                num_logits,
                [self.blocks.block_table(it.seq_id) for it in items],
                self.device,
            )
            logits = self.model.forward(batch, self.cache).cpu()  # [L, vocab] fp32
        except BaseException:
            # Undo the reservation: sequences fall back to their previous length (new ones are
            # forgotten). KV written into their released slots is garbage nobody reads.
            for item, start in zip(items, starts, strict=True):
                if start == 0:
                    self.blocks.free(item.seq_id)
                else:
                    self.blocks.truncate(item.seq_id, start)
            raise
        return list(torch.split(logits, num_logits))

    def truncate(self, seq_id: str, length: int) -> None:
        self.blocks.truncate(seq_id, max(0, length))

    def free(self, seq_id: str) -> None:
        self.blocks.free(seq_id)

    def evicted(self) -> list[str]:
        out, self._evicted = self._evicted, []
        return out

    def _reserve(self, items: list[ForwardItem]) -> None:
        """Take the batch's blocks, evicting idle sequences if needed (KVCacheFull if futile)."""
        needed = sum(self.blocks.blocks_needed(it.seq_id, len(it.token_ids)) for it in items)
        if needed > self.blocks.num_blocks:
            raise KVCacheFull(f"batch needs {needed} blocks, the pool has {self.blocks.num_blocks}")
        protected = {it.seq_id for it in items}
        self._evicted.extend(self.blocks.evict_lru(needed, protected))
        for it in items:
            self.blocks.allocate(it.seq_id, len(it.token_ids))
