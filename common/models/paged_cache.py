"""Paged KV cache: block bookkeeping (`BlockManager`) and the storage it indexes (`PagedKVCache`).

The cache is a pool of fixed-size blocks of `block_size` token slots. A sequence owns a list of
blocks (its block table); token `p` of a sequence lives in slot `p % block_size` of block
`table[p // block_size]`, i.e. at flat slot `table[p // block_size] * block_size + p % block_size`.
Sequences never need contiguous memory, so growing, truncating and evicting them is O(blocks)
bookkeeping and never copies KV.

`BlockManager` is pure bookkeeping (no tensors). `PagedKVCache` holds the per-layer tensors and
turns block tables into flat slot indices for the model's writes and reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from common.models.runner import KVCacheFull


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype | int, block_size: int
) -> int:
    """Bytes of one block across all layers: keys and values of `block_size` tokens."""
    itemsize = dtype if isinstance(dtype, int) else dtype.itemsize
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def num_blocks_for_budget(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype | int,
    block_size: int,
) -> int:
    """How many whole blocks fit in `budget_bytes` (`dtype` may be a torch dtype or an itemsize)."""
    per_block = bytes_per_block(num_layers, num_kv_heads, head_dim, dtype, block_size)
    return budget_bytes // per_block


class BlockManager:
    """Which blocks each sequence owns, how many tokens it holds, and how recently it was used."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Stack of free block ids; popping from the end hands out low ids first on a fresh pool.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._lens: dict[str, int] = {}
        # Sequence ids from least to most recently used.
        self._lru: OrderedDict[str, None] = OrderedDict()

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._tables

    def sequences(self) -> list[str]:
        """Known sequence ids, least recently used first."""
        return list(self._lru)

    def seq_len(self, seq_id: str) -> int:
        """Tokens held for seq_id (0 if unknown)."""
        return self._lens.get(seq_id, 0)

    def block_table(self, seq_id: str) -> list[int]:
        """Block ids of seq_id in token order (a copy; empty if unknown)."""
        return list(self._tables.get(seq_id, ()))

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Additional blocks that growing seq_id (new or known) by num_tokens would take."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, _ceil_div(self.seq_len(seq_id) + num_tokens, self.block_size) - have)

    def can_allocate(self, num_tokens: int, seq_id: str | None = None) -> bool:
        """Whether num_tokens more tokens for seq_id (a new sequence if None) fit in free blocks."""
        needed = (
            _ceil_div(num_tokens, self.block_size)
            if seq_id is None
            else self.blocks_needed(seq_id, num_tokens)
        )
        return needed <= self.num_free_blocks

    # -- mutations -----------------------------------------------------------------------------

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow seq_id (created if unknown) by num_tokens, taking blocks as needed.

        Returns the newly taken block ids. Raises KVCacheFull, changing nothing, when the free
        blocks do not suffice (call `evict_lru` first).
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.num_free_blocks:
            raise KVCacheFull(
                f"{seq_id!r} needs {needed} blocks, {self.num_free_blocks} free of {self.num_blocks}"
            )
        new_blocks = [self._free.pop() for _ in range(needed)]
        self._tables.setdefault(seq_id, []).extend(new_blocks)
        self._lens[seq_id] = self.seq_len(seq_id) + num_tokens
        self.touch(seq_id)
        return new_blocks

    def truncate(self, seq_id: str, length: int) -> None:
        """Keep the first `length` tokens of seq_id, releasing blocks past them (no-op if shorter)."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if seq_id not in self._tables or length >= self._lens[seq_id]:
            return
        table = self._tables[seq_id]
        keep = _ceil_div(length, self.block_size)
        self._release(table[keep:])
        del table[keep:]
        self._lens[seq_id] = length

    def free(self, seq_id: str) -> None:
        """Forget seq_id and release its blocks (no-op if unknown)."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        self._release(table)
        del self._lens[seq_id]
        del self._lru[seq_id]

    def touch(self, seq_id: str) -> None:
        """Mark seq_id as most recently used."""
        if seq_id in self._tables:
            self._lru[seq_id] = None
            self._lru.move_to_end(seq_id)

    def evict_lru(self, needed_blocks: int, protected: Iterable[str] = ()) -> list[str]:
        """Free least-recently-used sequences outside `protected` until `needed_blocks` are free.

        Returns the evicted ids, oldest first. Raises KVCacheFull, evicting nothing, when even
        evicting every unprotected sequence would not free enough blocks.
        """
        protected = set(protected)
        if needed_blocks <= self.num_free_blocks:
            return []
        # Sequences holding no blocks (truncated to 0) would free nothing: leave them alone.
        candidates = [s for s in self._lru if s not in protected and self._tables[s]]
        reclaimable = sum(len(self._tables[s]) for s in candidates)
        if self.num_free_blocks + reclaimable < needed_blocks:
            raise KVCacheFull(
                f"need {needed_blocks} blocks: {self.num_free_blocks} free + {reclaimable} "
                f"reclaimable of {self.num_blocks}"
            )
        evicted: list[str] = []
        for seq_id in candidates:
            if self.num_free_blocks >= needed_blocks:
                break
            self.free(seq_id)
            evicted.append(seq_id)
        return evicted

    def _release(self, blocks: Sequence[int]) -> None:
        # Reversed so that the block released first is handed out first again (keeps ids compact).
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Per-layer key/value storage, each of shape [num_blocks, block_size, num_kv_heads, head_dim].

    Seen flat as [num_blocks * block_size, num_kv_heads, head_dim], a token's KV sits at its flat
    slot (see module docstring), so a batch's writes are one `index_copy_` and its reads one
    gather per layer and tensor.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled, not empty: padded reads point at arbitrary slots, and although they are
        # masked out of attention, NaN garbage there would still poison `softmax @ V` (0 * NaN).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def slot_mapping(
        self, block_tables: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flat slot of token positions, given padded block tables.

        block_tables: [B, max_blocks] int64, each row a sequence's block table (padding: any
        valid block id). With `rows` ([N], the block-table row of each position) `positions` is
        [N] and the result [N]; without it `positions` is [B, P] and the result [B, P].
        """
        block_idx = positions // self.block_size  # [N] or [B, P]
        if rows is None:
            blocks = torch.gather(block_tables, 1, block_idx)  # [B, P]
        else:
            blocks = block_tables[rows, block_idx]  # [N]
        return blocks * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([T, num_kv_heads, head_dim]) at flat slots ([T] int64)."""
        self._flat(self.keys[layer]).index_copy_(0, slots, k)
        self._flat(self.values[layer]).index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at flat slots: [*slots.shape, num_kv_heads, head_dim] each."""
        k = self._flat(self.keys[layer])[slots]
        v = self._flat(self.values[layer])[slots]
        return k, v

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        # [num_blocks, block_size, H, D] -> [num_blocks * block_size, H, D], a view.
        return t.view(-1, *t.shape[2:])
