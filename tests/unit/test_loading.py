"""Model loading: offline by default, and a draft/target pair must share one vocabulary."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.models.loading import (
    ModelLoadError,
    VocabularyMismatch,
    load_model,
    load_pair,
    select_device,
)


def save_model(folder, corpus: list[str], vocab: int = 60) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab,
                                                        special_tokens=["<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def test_pair_with_different_tokenizers_is_refused_naming_both(tmp_path):
    a = save_model(tmp_path / "draft-a", ["def f(x): return x + 1"] * 20 + ["import os"] * 5)
    b = save_model(tmp_path / "target-b", ["the quick brown fox jumps"] * 20 + ["lazy dog"] * 5)
    with pytest.raises(VocabularyMismatch) as err:
        load_pair(draft=a, target=b, device="cpu")
    assert "draft-a" in str(err.value) and "target-b" in str(err.value)
    assert "vocabular" in str(err.value)


def test_pair_sharing_a_tokenizer_loads(tmp_path):
    corpus = ["def f(x): return x + 1"] * 20
    draft, target = load_pair(draft=save_model(tmp_path / "d", corpus),
                              target=save_model(tmp_path / "t", corpus), device="cpu")
    assert draft.vocab_size == target.vocab_size and str(target.dtype) == "torch.float32"


def test_unknown_model_is_a_clear_error_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(ModelLoadError, match="downloads are off"):
        load_model("some-org/some-model", device="cpu")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path), device="cpu")  # an existing folder with no model in it


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda")
