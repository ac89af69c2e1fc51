"""Llama/Qwen2-family forward over a ragged batch and a paged KV cache.

All new tokens of all items are flattened into one [T, hidden] activation, so every per-token op
(embedding, norms, projections, MLP) is one matmul for the whole batch whatever its mix of long
cold prefills and short warm continuations. Only attention needs the per-item structure: it runs
as one padded, masked `scaled_dot_product_attention` per layer over each item's cached + new
keys, gathered from the paged cache.

The math follows transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` (4.x and 5.x) so that
logits match a plain HF forward of the same model; weights are referenced, never copied.

Shape legend: T new tokens in the batch, B items, q_max the most new tokens of one item, kv_max
the longest item after this step rounded up to whole blocks, L rows whose logits are wanted,
H/Hkv query/key-value heads, D head_dim, E hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.models.paged_cache import PagedKVCache

# RoPE variants whose frequencies do not depend on the sequence length, so one table serves
# every position. "dynamic"/"longrope"/"yarn"-style variants are left to HFRunner.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2"})


def rope_parameters(config) -> dict:
    """RoPE settings as a dict with at least `rope_type` and `rope_theta`.

    transformers 5.x keeps them in `config.rope_parameters`; 4.x has `config.rope_theta` and an
    optional `config.rope_scaling` dict (with "type" in old checkpoints, "rope_type" in newer).
    """
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def unsupported_reason(model) -> str | None:
    """Why `PagedLlama` cannot run this model (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} is not one of {sorted(STATIC_ROPE_TYPES)}"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention is in use"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} are not all full_attention"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


def _inv_freq_and_scale(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [D/2] (fp32, CPU) and the cos/sin scaling factor."""
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        theta = float(params["rope_theta"])
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponent), 1.0
    # Scaled variants: reuse transformers' own init so the frequencies are exactly HF's.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(slots=True)
class _LayerWeights:
    """References to one decoder layer's parameters (biases are None when absent)."""

    input_norm: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_w: torch.Tensor
    gate_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None

    @classmethod
    def of(cls, layer) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            input_norm=layer.input_layernorm.weight,
            q_w=attn.q_proj.weight,
            q_b=attn.q_proj.bias,
            k_w=attn.k_proj.weight,
            k_b=attn.k_proj.bias,
            v_w=attn.v_proj.weight,
            v_b=attn.v_proj.bias,
            o_w=attn.o_proj.weight,
            o_b=attn.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            gate_w=mlp.gate_proj.weight,
            gate_b=mlp.gate_proj.bias,
            up_w=mlp.up_proj.weight,
            up_b=mlp.up_proj.bias,
            down_w=mlp.down_proj.weight,
            down_b=mlp.down_proj.bias,
        )


@dataclass(slots=True)
class RaggedBatch:
    """Device-side layout of one forward: built once, shared by every layer."""

    token_ids: torch.Tensor  # [T] new tokens, item after item
    positions: torch.Tensor  # [T] absolute position of each new token
    write_slots: torch.Tensor  # [T] flat cache slot of each new token
    read_slots: torch.Tensor  # [B, kv_max] flat cache slot of each item's keys, padded
    pad_rows: torch.Tensor  # [T] row of each new token in the padded [B * q_max] query layout
    mask: torch.Tensor  # [B, 1, q_max, kv_max] True where the query may attend the key
    logit_rows: torch.Tensor  # [L] rows of [T] whose logits are wanted, item after item
    num_items: int
    q_max: int

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        token_ids: list[list[int]],
        starts: list[int],
        num_logits: list[int],
        block_tables: list[list[int]],
        device: torch.device,
    ) -> RaggedBatch:
        """Lay out items whose new tokens `token_ids[b]` start at position `starts[b]`.

        `block_tables[b]` must already cover positions [0, starts[b] + len(token_ids[b])), and
        `num_logits[b]` is in [1, len(token_ids[b])].
        """
        num_items = len(token_ids)
        lens = [len(t) for t in token_ids]
        q_max = max(lens)
        max_blocks = max(len(t) for t in block_tables)
        # Keys are read in whole blocks: kv_max >= the longest item, a multiple of block_size
        # (which keeps the mask's last dim aligned for the fused SDPA kernels).
        kv_max = max_blocks * cache.block_size

        # Small per-item metadata is built on the CPU and moved in a few copies; the per-token
        # and per-slot indices are then derived on the device.
        flat_ids = [tok for toks in token_ids for tok in toks]
        tables = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        logit_rows: list[int] = []
        offset = 0
        for n, k in zip(lens, num_logits, strict=True):
            logit_rows.extend(range(offset + n - k, offset + n))
            offset += n

        def to_dev(data: list) -> torch.Tensor:
            return torch.tensor(data, dtype=torch.int64).to(device, non_blocking=True)

        ids_t, tables_t, rows_t = to_dev(flat_ids), to_dev(tables), to_dev(logit_rows)
        starts_t, lens_t = to_dev(starts), to_dev(lens)
        total_tokens = len(flat_ids)

        item_of_token = torch.repeat_interleave(
            torch.arange(num_items, device=device), lens_t, output_size=total_tokens
        )  # [T]
        first_token = torch.cumsum(lens_t, 0) - lens_t  # [B] offset of each item in [T]
        index_in_item = torch.arange(total_tokens, device=device) - first_token[item_of_token]
        positions = starts_t[item_of_token] + index_in_item  # [T]
        write_slots = cache.slot_mapping(tables_t, positions, rows=item_of_token)  # [T]

        kv_pos = torch.arange(kv_max, device=device)  # [kv_max]
        # [B, kv_max]; slots past an item's end are valid (padded table rows) but masked below.
        read_slots = cache.slot_mapping(tables_t, kv_pos.expand(num_items, kv_max))

        # Query row i of item b sits at position starts[b] + i and sees keys at positions <= it
        # (its cache plus its own causal prefix). Padded rows reuse the item's last position so
        # that no row is fully masked (which would make SDPA return NaN).
        q_idx = torch.arange(q_max, device=device)  # [q_max]
        q_pos = starts_t[:, None] + torch.minimum(q_idx[None, :], lens_t[:, None] - 1)  # [B, q_max]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [B, 1, q_max, kv_max]

        return cls(
            token_ids=ids_t,
            positions=positions,
            write_slots=write_slots,
            read_slots=read_slots,
            pad_rows=item_of_token * q_max + index_in_item,
            mask=mask,
            logit_rows=rows_t,
            num_items=num_items,
            q_max=q_max,
        )


class PagedLlama:
    """The forward math of a Llama/Qwen2 causal LM, reading weights from the HF model."""

    def __init__(self, model) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PagedLlama cannot run this model: {reason}")
        config = model.config
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps

        base = model.model
        self.embed = base.embed_tokens.weight  # [vocab, E]
        self.final_norm = base.norm.weight  # [E]
        self.lm_head = model.lm_head.weight  # [vocab, E] (the embedding itself when tied)
        self.layers = [_LayerWeights.of(layer) for layer in base.layers[: self.num_layers]]
        self.vocab_size = self.lm_head.shape[0]
        self.dtype = self.embed.dtype
        self.device = self.embed.device

        inv_freq, self.rope_scale = _inv_freq_and_scale(config, self.head_dim)
        self.inv_freq = inv_freq.to(self.device)  # [D/2] fp32

    def new_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache(
            self.num_layers,
            num_blocks,
            block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )

    def forward(self, batch: RaggedBatch, cache: PagedKVCache) -> torch.Tensor:
        """Run the batch, writing its new K/V into `cache`; returns fp32 logits [L, vocab]."""
        x = F.embedding(batch.token_ids, self.embed)  # [T, E]
        cos, sin = self._rope(batch.positions)  # [T, 1, D] each
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w.input_norm)
            x = x + self._attention(i, w, h, cos, sin, batch, cache)
            h = self._rms_norm(x, w.post_norm)
            gate = F.silu(F.linear(h, w.gate_w, w.gate_b))  # [T, I]
            x = x + F.linear(gate * F.linear(h, w.up_w, w.up_b), w.down_w, w.down_b)
        # Norm and LM head only on the rows whose logits are wanted (per-token ops, so the
        # skipped rows cannot affect the kept ones).
        h = self._rms_norm(x[batch.logit_rows], self.final_norm)  # [L, E]
        return F.linear(h, self.lm_head).float()  # [L, vocab]

    def _attention(
        self,
        layer: int,
        w: _LayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: RaggedBatch,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        total = h.shape[0]
        q = F.linear(h, w.q_w, w.q_b).view(total, self.num_heads, self.head_dim)  # [T, H, D]
        k = F.linear(h, w.k_w, w.k_b).view(total, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = F.linear(h, w.v_w, w.v_b).view(total, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        # New K/V go in first so that the gather below sees each item's cache and new tokens.
        cache.write(layer, batch.write_slots, k, v)
        keys, values = cache.gather(layer, batch.read_slots)  # [B, kv_max, Hkv, D] each
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, kv_max, D]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # GQA: query head j reads kv head j // groups, as in HF's repeat_kv.
            keys = keys.repeat_interleave(groups, dim=1)  # [B, H, kv_max, D]
            values = values.repeat_interleave(groups, dim=1)

        # Scatter the flat queries into a padded [B, q_max] layout for one batched call.
        b, q_max = batch.num_items, batch.q_max
        q_pad = q.new_zeros(b * q_max, self.num_heads, self.head_dim)
        q_pad[batch.pad_rows] = q
        q_pad = q_pad.view(b, q_max, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,q_max,D]
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=batch.mask)
        out = out.transpose(1, 2).reshape(b * q_max, self.num_heads * self.head_dim)
        return F.linear(out[batch.pad_rows], w.o_w, w.o_b)  # [T, E]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] at absolute positions, computed in fp32 as HF does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        return cos[:, None, :], sin[:, None, :]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 (HF's LlamaRMSNorm), then back to the model dtype before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)
