"""BlockManager bookkeeping, the budget helper, and PagedKVCache slot arithmetic."""

from __future__ import annotations

import pytest
import torch

from common.models.paged_cache import (
    BlockManager,
    PagedKVCache,
    bytes_per_block,
    num_blocks_for_budget,
)
from common.models.runner import KVCacheFull


def test_allocate_grows_across_block_boundaries() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8 and bm.seq_len("a") == 0 and bm.block_table("a") == []
    assert bm.allocate("a", 3) == [0]  # 3 tokens: one block
    assert bm.allocate("a", 1) == []  # fills block 0 exactly
    assert bm.allocate("a", 1) == [1]  # token 4 opens a new block
    assert bm.allocate("a", 8) == [2, 3]  # 13 tokens: 4 blocks
    assert bm.seq_len("a") == 13 and bm.block_table("a") == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4
    assert bm.allocate("b", 5) == [4, 5]
    assert bm.num_free_blocks == 2 and "b" in bm and "c" not in bm


def test_blocks_needed_and_can_allocate() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 6)  # 2 blocks, 2 free slots in the second
    assert bm.blocks_needed("a", 2) == 0
    assert bm.blocks_needed("a", 3) == 1
    assert bm.blocks_needed("new", 5) == 2
    assert bm.can_allocate(4) and not bm.can_allocate(5)  # a new sequence
    assert bm.can_allocate(6, seq_id="a") and not bm.can_allocate(7, seq_id="a")


def test_exhaustion_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 5)
    with pytest.raises(KVCacheFull):
        bm.allocate("a", 4)  # 9 tokens need 3 blocks
    with pytest.raises(KVCacheFull):
        bm.allocate("b", 1)
    assert bm.seq_len("a") == 5 and bm.block_table("a") == [0, 1] and "b" not in bm


def test_truncate_releases_blocks_past_the_new_length() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 13)  # blocks 0..3
    bm.truncate("a", 20)  # longer: no-op
    assert bm.seq_len("a") == 13
    bm.truncate("a", 8)  # exactly two full blocks
    assert bm.block_table("a") == [0, 1] and bm.seq_len("a") == 8 and bm.num_free_blocks == 6
    bm.truncate("a", 5)  # partial second block is kept
    assert bm.block_table("a") == [0, 1] and bm.seq_len("a") == 5
    bm.truncate("a", 0)
    assert bm.block_table("a") == [] and bm.seq_len("a") == 0 and bm.num_free_blocks == 8
    bm.truncate("unknown", 0)  # no-op
    with pytest.raises(ValueError):
        bm.truncate("a", -1)


def test_released_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)  # [0, 1]
    bm.allocate("b", 4)  # [2, 3]
    bm.truncate("a", 1)  # releases 1
    assert bm.allocate("b", 2) == [1]
    assert bm.num_free_blocks == 0


def test_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 9)
    bm.free("a")
    bm.free("a")  # unknown: no-op
    assert "a" not in bm and bm.seq_len("a") == 0 and bm.num_free_blocks == 4
    assert bm.sequences() == []


def test_lru_order_follows_allocate_and_touch() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    for s in "abc":
        bm.allocate(s, 4)
    assert bm.sequences() == ["a", "b", "c"]
    bm.touch("a")
    bm.allocate("b", 1)
    bm.touch("unknown")  # ignored
    assert bm.sequences() == ["c", "a", "b"]


def test_evict_lru_frees_oldest_first_and_skips_protected() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate("a", 8)  # 2 blocks
    bm.allocate("b", 4)  # 1 block
    bm.allocate("c", 8)  # 2 blocks
    bm.allocate("empty", 0)  # holds no blocks, so evicting it would free nothing
    bm.touch("a")  # LRU order: b, c, empty, a
    assert bm.evict_lru(1) == []  # one block is already free
    assert bm.evict_lru(2, protected={"b"}) == ["c"]  # b is oldest but protected
    assert "b" in bm and "c" not in bm and bm.num_free_blocks == 3
    assert bm.evict_lru(6) == ["b", "a"]
    assert bm.num_free_blocks == 6 and bm.sequences() == ["empty"]


def test_evict_lru_impossible_raises_without_evicting() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 8)
    bm.allocate("b", 8)
    with pytest.raises(KVCacheFull):
        bm.evict_lru(3, protected={"a"})  # evicting b gives only 2
    assert bm.sequences() == ["a", "b"] and bm.num_free_blocks == 0


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_budget_to_num_blocks() -> None:
    # 2 (K and V) * 3 layers * 16 tokens * 2 heads * 8 dims * 2 bytes = 3072 bytes per block.
    assert bytes_per_block(3, 2, 8, torch.bfloat16, 16) == 3072
    assert bytes_per_block(3, 2, 8, 2, 16) == 3072
    assert num_blocks_for_budget(10 * 3072 + 3071, 3, 2, 8, torch.bfloat16, 16) == 10
    assert num_blocks_for_budget(10 * 3072, 3, 2, 8, torch.float32, 16) == 5
    assert num_blocks_for_budget(100, 3, 2, 8, torch.float32, 16) == 0


def test_paged_cache_slots_write_and_gather() -> None:
    cache = PagedKVCache(
        num_layers=2, num_blocks=4, block_size=2, num_kv_heads=1, head_dim=3,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    assert cache.keys[0].shape == (4, 2, 1, 3) and cache.nbytes == 2 * 2 * 4 * 2 * 3 * 4
    tables = torch.tensor([[3, 1], [2, 0]])  # item 0 owns blocks 3, 1; item 1 owns block 2
    # Item 0, positions 1..3 -> slots 7 (block 3, offset 1), 2, 3 (block 1).
    slots = cache.slot_mapping(tables, torch.tensor([1, 2, 3, 0]), rows=torch.tensor([0, 0, 0, 1]))
    assert slots.tolist() == [7, 2, 3, 4]
    k = torch.arange(12, dtype=torch.float32).view(4, 1, 3)
    cache.write(1, slots, k, -k)
    read = cache.slot_mapping(tables, torch.arange(4).expand(2, 4))
    assert read.tolist() == [[6, 7, 2, 3], [4, 5, 0, 1]]
    keys, values = cache.gather(1, read)  # [2, 4, 1, 3]
    assert torch.equal(keys[0, 1:], k[:3]) and torch.equal(values[0, 1:], -k[:3])
    assert torch.equal(keys[1, 0], k[3])
    assert cache.keys[0].abs().sum() == 0  # other layers untouched
