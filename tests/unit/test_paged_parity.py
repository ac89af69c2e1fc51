"""PagedRunner logits equal a plain transformers forward of the full sequence (fp32 CPU).

Block size 4 throughout, so prompts and continuations cross block boundaries all the time.
"""

from __future__ import annotations

import pytest
import torch

from common.models.paged_runner import PagedRunner
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, SequenceTooLong
from tests.unit.tiny_random_models import (
    MAX_POSITIONS,
    VOCAB,
    check_forward,
    random_tokens,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

FAMILIES = {
    "llama": lambda: tiny_llama(),
    "llama_bias": lambda: tiny_llama(seed=1, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: tiny_qwen2(),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


def make(model, num_blocks: int = 64) -> PagedRunner:
    return PagedRunner(model, num_blocks=num_blocks, block_size=4)


def warm(runner, model, history, lengths: dict[str, int], seed: int = 100) -> None:
    items = [ForwardItem(s, random_tokens(n, seed + i)) for i, (s, n) in enumerate(lengths.items())]
    check_forward(runner, model, history, items)


def test_is_a_model_runner(model) -> None:
    runner = make(model)
    assert isinstance(runner, ModelRunner)
    assert runner.vocab_size == VOCAB and runner.max_positions == MAX_POSITIONS
    assert runner.dtype == torch.float32 and runner.device.type == "cpu"


def test_cold_prefill_batch(model) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 1, "b": 4, "c": 5, "d": 13, "e": 30})


def test_warm_and_cold_mixed_batch(model) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 3, "b": 4, "c": 9, "d": 17})
    # Appends of 1..8 tokens to caches of different lengths (several cross a block boundary)
    # next to cold prefills of new sequences, in one pass.
    items = [
        ForwardItem("a", random_tokens(1, 1)),
        ForwardItem("new1", random_tokens(6, 2)),
        ForwardItem("b", random_tokens(8, 3)),
        ForwardItem("c", random_tokens(3, 4), num_logits=2),
        ForwardItem("new2", random_tokens(1, 5)),
        ForwardItem("d", random_tokens(5, 6)),
    ]
    check_forward(runner, model, history, items)
    # And once more, all warm, decode-sized.
    check_forward(runner, model, history, [ForwardItem(s, random_tokens(2, 7)) for s in history])


def test_truncate_then_append_different_tokens(model) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 10, "b": 12, "c": 6})
    check_forward(runner, model, history, [ForwardItem("a", random_tokens(6, 1))])  # a: 16
    free_before = runner.blocks.num_free_blocks
    runner.truncate("a", 11)  # roll back 5 tokens: 16 -> 11, releases block 3 (positions 12..15)
    runner.truncate("b", 8)  # exactly at a block boundary
    runner.truncate("c", 50)  # longer: no-op
    assert runner.cached_len("a") == 11 and runner.cached_len("b") == 8
    assert runner.cached_len("c") == 6
    assert runner.blocks.num_free_blocks == free_before + 2
    items = [
        ForwardItem("a", random_tokens(7, 2)),  # different tokens over the rolled-back range
        ForwardItem("b", random_tokens(3, 3)),
        ForwardItem("c", random_tokens(1, 4)),
    ]
    check_forward(runner, model, history, items)
    runner.truncate("a", 0)
    assert runner.cached_len("a") == 0
    check_forward(runner, model, history, [ForwardItem("a", random_tokens(5, 5))])


def test_num_logits_returns_trailing_positions(model) -> None:
    runner, history = make(model), {}
    outs = check_forward(
        runner,
        model,
        history,
        [ForwardItem("a", random_tokens(9, 1), num_logits=1), ForwardItem("b", [5, 6, 7])],
    )
    assert [o.shape for o in outs] == [(1, VOCAB), (3, VOCAB)]
    outs = check_forward(
        runner, model, history, [ForwardItem("a", random_tokens(4, 2), num_logits=3)]
    )
    assert outs[0].shape == (3, VOCAB)


def test_lru_eviction_and_reprefill(model) -> None:
    runner, history = make(model, num_blocks=8), {}  # 32 token slots
    warm(runner, model, history, {"a": 10, "b": 10})  # 3 + 3 blocks
    check_forward(runner, model, history, [ForwardItem("b", [1])])  # b is now most recent
    check_forward(runner, model, history, [ForwardItem("c", random_tokens(8, 1))])  # 2 blocks
    assert runner.evicted() == [] and runner.blocks.num_free_blocks == 0
    # d needs 2 blocks: the least recently used (a) goes.
    check_forward(runner, model, history, [ForwardItem("d", random_tokens(5, 2))])
    assert runner.evicted() == ["a"] and runner.evicted() == []  # drained on read
    assert runner.cached_len("a") == 0
    check_forward(runner, model, history, [ForwardItem("b", [2])])  # LRU order: c, d, b
    # c is the least recently used but in the batch, so it is protected and d goes.
    items = [ForwardItem("c", random_tokens(1, 3)), ForwardItem("e", random_tokens(4, 4))]
    check_forward(runner, model, history, items)
    assert runner.evicted() == ["d"]
    # Re-prefill a from its full history plus a new token (3 blocks): b, now the oldest, goes.
    check_forward(runner, model, history, [ForwardItem("a", history["a"] + [3])])
    assert runner.evicted() == ["b"]
    assert runner.cached_len("a") == 11 and runner.cached_len("c") == 9


def test_kv_cache_full_when_the_batch_cannot_fit(model) -> None:
    runner, history = make(model, num_blocks=4), {}
    warm(runner, model, history, {"a": 4, "b": 4})
    with pytest.raises(KVCacheFull):  # 17 tokens need 5 blocks, the pool has 4
        runner.forward([ForwardItem("x", random_tokens(17, 1))])
    with pytest.raises(KVCacheFull):  # 3 free after evicting b, a is in the batch
        runner.forward([ForwardItem("a", [1]), ForwardItem("x", random_tokens(12, 2))])
    assert runner.evicted() == []  # nothing evicted in vain
    assert runner.cached_len("a") == 4 and runner.cached_len("b") == 4
    assert runner.cached_len("x") == 0 and runner.blocks.num_free_blocks == 2
    check_forward(runner, model, history, [ForwardItem("a", [1]), ForwardItem("b", [2])])


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (ForwardItem("b", []), ValueError),
        (ForwardItem("b", [1, VOCAB]), ValueError),
        (ForwardItem("b", [-1]), ValueError),
        (ForwardItem("a", [1]), ValueError),  # duplicate of the first item
        (ForwardItem("b", [1, 2], num_logits=3), ValueError),
        (ForwardItem("b", [1] * (MAX_POSITIONS + 1)), SequenceTooLong),
        (ForwardItem("long", [1] * (MAX_POSITIONS - 3)), SequenceTooLong),
    ],
)
def test_errors_append_nothing(model, bad, error) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 5, "long": 4})
    free_before = runner.blocks.num_free_blocks
    with pytest.raises(error):
        runner.forward([ForwardItem("a", [1, 2]), bad])
    assert runner.cached_len("a") == 5 and runner.cached_len("long") == 4
    assert runner.cached_len("b") == 0 and runner.blocks.num_free_blocks == free_before
    check_forward(runner, model, history, [ForwardItem("a", [3])])


def test_exactly_max_positions_is_allowed(model) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": MAX_POSITIONS - 2})
    check_forward(runner, model, history, [ForwardItem("a", [1, 2], num_logits=1)])
    with pytest.raises(SequenceTooLong):
        runner.forward([ForwardItem("a", [3])])


def test_failure_inside_the_pass_rolls_back(model, monkeypatch) -> None:
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 6})
    free_before = runner.blocks.num_free_blocks

    def boom(*args, **kwargs):
        raise RuntimeError("simulated device error")

    monkeypatch.setattr(runner.model, "forward", boom)
    with pytest.raises(RuntimeError):
        runner.forward([ForwardItem("a", random_tokens(7, 1)), ForwardItem("n", [1, 2])])
    assert runner.cached_len("a") == 6 and runner.cached_len("n") == 0
    assert runner.blocks.num_free_blocks == free_before
    monkeypatch.undo()
    check_forward(runner, model, history, [ForwardItem("a", [4])])


def test_free_and_empty_batch(model) -> None:
    runner, history = make(model, num_blocks=8), {}
    warm(runner, model, history, {"a": 9})
    runner.free("a")
    runner.free("a")
    assert runner.cached_len("a") == 0 and runner.blocks.num_free_blocks == 8
    assert runner.forward([]) == []
    assert runner.evicted() == []  # freeing is not evicting


def test_kv_budget_sizes_the_pool() -> None:
    model = tiny_llama()
    # 2 * 3 layers * 16 tokens * 2 kv heads * 16 dims * 4 bytes = 12288 bytes per block.
    runner = PagedRunner(model, kv_budget_bytes=10 * 12288 + 5)
    assert runner.blocks.num_blocks == 10 and runner.blocks.block_size == 16
    assert runner.cache.nbytes == 10 * 12288
    with pytest.raises(ValueError):
        PagedRunner(model, kv_budget_bytes=100)


def test_llama3_rope_mha_and_wide_heads() -> None:
    """llama3 RoPE scaling, no GQA, head_dim (32) != hidden_size / heads (16)."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = tiny_llama(seed=2, rope_parameters=rope, num_key_value_heads=4, head_dim=32)
    assert PagedRunner.supports(model)
    runner, history = make(model), {}
    warm(runner, model, history, {"a": 40, "b": 7})
    check_forward(runner, model, history, [ForwardItem("a", [1, 2, 3]), ForwardItem("b", [4])])


def test_supports() -> None:
    assert PagedRunner.supports(tiny_llama()) and PagedRunner.supports(tiny_qwen2())
    assert not PagedRunner.supports(tiny_gpt2())
    sliding = tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert not PagedRunner.supports(sliding)
    dynamic = tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    assert not PagedRunner.supports(dynamic)
    with pytest.raises(ValueError):
        PagedRunner(tiny_gpt2())
