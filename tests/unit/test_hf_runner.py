"""HFRunner behaves like PagedRunner (same contract, same parity checks) for any causal LM, and
make_runner picks the right runner."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from common.models.hf_runner import HFRunner
from common.models.paged_runner import PagedRunner
from common.models.runner import ForwardItem, KVCacheFull, ModelRunner, SequenceTooLong
from common.models.runner_factory import make_runner
from tests.unit.tiny_random_models import (
    MAX_POSITIONS,
    VOCAB,
    check_forward,
    random_tokens,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return FAMILIES[request.param]()


def warm(runner, model, history, lengths: dict[str, int], seed: int = 100) -> None:
    items = [ForwardItem(s, random_tokens(n, seed + i)) for i, (s, n) in enumerate(lengths.items())]
    check_forward(runner, model, history, items)


def test_crop_semantics_of_installed_transformers() -> None:
    """HFRunner.truncate relies on crop(-n) removing the last n tokens."""
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), layer_idx=0)
    cache.crop(-3)
    assert cache.get_seq_length() == 4


def test_is_a_model_runner(model) -> None:
    runner = HFRunner(model)
    assert isinstance(runner, ModelRunner)
    assert runner.vocab_size == VOCAB and runner.max_positions == MAX_POSITIONS
    assert runner.dtype == torch.float32 and runner.device.type == "cpu"


def test_prefill_then_mixed_batch(model) -> None:
    runner, history = HFRunner(model), {}
    warm(runner, model, history, {"a": 1, "b": 5, "c": 13})
    items = [
        ForwardItem("a", random_tokens(1, 1)),
        ForwardItem("new", random_tokens(6, 2)),
        ForwardItem("b", random_tokens(8, 3), num_logits=2),
        ForwardItem("c", random_tokens(3, 4), num_logits=1),
    ]
    outs = check_forward(runner, model, history, items)
    assert [o.shape[0] for o in outs] == [1, 6, 2, 1]


def test_truncate_then_append_different_tokens(model) -> None:
    runner, history = HFRunner(model), {}
    warm(runner, model, history, {"a": 12, "b": 6})
    runner.truncate("a", 7)
    runner.truncate("b", 50)  # longer: no-op
    runner.truncate("unknown", 0)  # no-op
    assert runner.cached_len("a") == 7 and runner.cached_len("b") == 6
    items = [ForwardItem("a", random_tokens(5, 1)), ForwardItem("b", random_tokens(2, 2))]
    check_forward(runner, model, history, items)
    runner.truncate("a", 0)
    assert runner.cached_len("a") == 0
    check_forward(runner, model, history, [ForwardItem("a", random_tokens(3, 3))])
    assert runner.evicted() == []


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
    runner, history = HFRunner(model), {}
    warm(runner, model, history, {"a": 5, "long": 4})
    with pytest.raises(error):
        runner.forward([ForwardItem("a", [1, 2]), bad])
    assert runner.cached_len("a") == 5 and runner.cached_len("long") == 4
    assert runner.cached_len("b") == 0
    check_forward(runner, model, history, [ForwardItem("a", [3])])


def test_failure_inside_the_batch_rolls_back(model, monkeypatch) -> None:
    runner, history = HFRunner(model), {}
    warm(runner, model, history, {"a": 6, "b": 3})
    real_forward, calls = model.forward, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device error")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError):  # a and new run, b fails
        runner.forward(
            [ForwardItem("a", [1, 2]), ForwardItem("new", [3]), ForwardItem("b", [4, 5])]
        )
    monkeypatch.undo()
    assert runner.cached_len("a") == 6 and runner.cached_len("new") == 0
    # b may have been updated in some layers only, so it is dropped (an eviction).
    assert runner.cached_len("b") == 0 and runner.evicted() == ["b"]
    check_forward(runner, model, history, [ForwardItem("a", [7]), ForwardItem("b", [8])])


def test_max_sequences_lru_eviction() -> None:
    model = tiny_llama()
    runner, history = HFRunner(model, max_sequences=3), {}
    warm(runner, model, history, {"a": 4, "b": 4, "c": 4})
    check_forward(runner, model, history, [ForwardItem("a", [1])])  # LRU order: b, c, a
    # b is the oldest but in the batch, so c goes to make room for d.
    check_forward(runner, model, history, [ForwardItem("b", [2]), ForwardItem("d", [3, 4])])
    assert runner.evicted() == ["c"] and runner.cached_len("c") == 0
    with pytest.raises(KVCacheFull):
        runner.forward([ForwardItem(s, [1]) for s in "wxyz"])
    assert runner.evicted() == [] and runner.cached_len("a") == 5
    check_forward(runner, model, history, [ForwardItem("c", history["c"] + [5])])  # re-prefill
    assert runner.evicted() == ["a"]


def test_free_and_empty_batch() -> None:
    model = tiny_qwen2()
    runner, history = HFRunner(model), {}
    warm(runner, model, history, {"a": 3})
    runner.free("a")
    runner.free("a")
    assert runner.cached_len("a") == 0 and runner.forward([]) == [] and runner.evicted() == []


def test_hf_and_paged_runners_agree() -> None:
    model = tiny_qwen2(seed=3)
    hf, paged = HFRunner(model), PagedRunner(model, num_blocks=16, block_size=4)
    batches = [
        [ForwardItem("a", random_tokens(11, 1)), ForwardItem("b", random_tokens(3, 2))],
        [ForwardItem("a", random_tokens(4, 3)), ForwardItem("b", random_tokens(6, 4))],
    ]
    for batch in batches:
        for x, y in zip(hf.forward(batch), paged.forward(batch), strict=True):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_make_runner_picks_paged_for_llama_and_qwen2() -> None:
    for model in (tiny_llama(), tiny_qwen2()):
        runner = make_runner(model, num_blocks=12, block_size=4, max_sequences=2)
        assert isinstance(runner, PagedRunner) and runner.blocks.num_blocks == 12


def test_make_runner_falls_back_to_hf_for_gpt2() -> None:
    model = tiny_gpt2()
    runner = make_runner(model, kv_budget_bytes=1 << 20, max_sequences=2)
    assert isinstance(runner, HFRunner) and runner.max_sequences == 2
    check_forward(runner, model, {}, [ForwardItem("a", random_tokens(9, 1), num_logits=4)])
    sliding = tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert isinstance(make_runner(sliding), HFRunner)
    with pytest.raises(TypeError):
        make_runner(model, nonsense=1)
