"""Tiny random-init causal LMs for fast CPU tests (fp32, eval mode, eager attention, seeded).

Every builder returns a fresh model; the same seed gives the same weights. Biases and norm
scales are randomized too (HF initializes them to 0 and 1), so tests notice a runner that drops
or misapplies them.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Ops on these models are far too small to gain from intra-op threads, and on a busy machine
# OpenMP workers contending for cores made the parity tests ~7x slower. This is process-wide:
# importing this module pins torch to one thread for the rest of the test session.
torch.set_num_threads(1)

VOCAB = 97
MAX_POSITIONS = 64

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per kv head
    max_position_embeddings=MAX_POSITIONS,
)


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "norm" in name or name.endswith("ln_f.weight") or ".ln_" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.float().eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama without biases by default; `attention_bias=True, mlp_bias=True` adds them."""
    config = LlamaConfig(**{**_COMMON, "rope_theta": 10000.0, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(config), seed)


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """Qwen2: q/k/v bias, tied embeddings (like the small Qwen2.5 checkpoints)."""
    config = Qwen2Config(
        **{**_COMMON, "rope_theta": 1000000.0, "tie_word_embeddings": True, **overrides}
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """An architecture PagedRunner does not handle (learned positions, LayerNorm, GELU)."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(config), seed)


def random_tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """Plain transformers forward of the full sequence, no cache: fp32 [n, vocab]."""
    ids = torch.tensor([token_ids], dtype=torch.int64, device=next(model.parameters()).device)
    return model(input_ids=ids, use_cache=False).logits[0].float()


def check_forward(
    runner, model: torch.nn.Module, history: dict[str, list[int]], items: list, atol: float = 1e-4
) -> list[torch.Tensor]:
    """Run `items` on a ModelRunner and compare each result with a plain HF forward.

    `history[seq_id]` is every token sent for seq_id so far; the new tokens continue the part
    of it the runner still caches (`cached_len`, so truncation and eviction are accounted for).
    Updates `history` and returns the runner's logits.
    """
    prefixes = {
        it.seq_id: history.get(it.seq_id, [])[: runner.cached_len(it.seq_id)] for it in items
    }
    outs = runner.forward(items)
    assert len(outs) == len(items)
    for item, out in zip(items, outs, strict=True):
        full = prefixes[item.seq_id] + list(item.token_ids)
        want = reference_logits(model, full)[-(item.num_logits or len(item.token_ids)) :]
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert out.shape == want.shape, (item.seq_id, out.shape, want.shape)
        torch.testing.assert_close(
            out, want, atol=atol, rtol=1e-4, msg=lambda m, s=item.seq_id: f"{s}: {m}"
        )
        assert runner.cached_len(item.seq_id) == len(full)
        history[item.seq_id] = full
    return outs
