"""Our own forward pass for the llama family, reading the HF model's modules.

Projections are called as modules, so a QuantLinear (and its fast kernel) plugs in unchanged;
rotary embeddings come from the model's own rotary module (so rope scaling is honoured exactly
as transformers implements it). Differences between families are data (FAMILIES).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass(frozen=True)
class Family:
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on q and k before rope


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"the engine has no forward for model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))} (use transformers generate() for others)")
    return FAMILIES[model_type]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaForward:
    """Prefill one request / decode a batch of slots, writing K/V into a KVCache."""

    def __init__(self, model, head=None):
        self.model = model
        self.family = family_of(model.config)
        cfg = model.config
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.head = head if head is not None else model.lm_head
        self.qkv: list = [None] * len(self.layers)  # fused (q, k, v) projections, set by fuse()
        self.gate_up: list = [None] * len(self.layers)
        self.native = None  # a NativeDecode (engine/native_decode.py) replacing decode's layer loop

    def fuse(self) -> int:
        """Fuse q/k/v and gate/up of quantized layers; -> number of fused groups."""
        from .fuse import fuse_quant_linears

        count = 0
        for i, layer in enumerate(self.layers):
            a, m = layer.self_attn, layer.mlp
            self.qkv[i] = fuse_quant_linears([a.q_proj, a.k_proj, a.v_proj])
            self.gate_up[i] = fuse_quant_linears([m.gate_proj, m.up_proj])
            count += (self.qkv[i] is not None) + (self.gate_up[i] is not None)
        return count

    def _attention_inputs(self, i, layer, x, cos, sin):
        b, t, _ = x.shape
        attn = layer.self_attn
        if self.qkv[i] is not None:
            q, k, v = self.qkv[i](x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                             self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.family.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _mlp(self, i, layer, h):
        x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        if self.gate_up[i] is not None:
            gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return h + mlp.down_proj(mlp.act_fn(gate) * up)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """ids (T,) of one request -> logits (V,) of its last position; K/V land in `slot`."""
        t = ids.shape[0]
        positions = torch.arange(t).unsqueeze(0)
        h = self.inner.embed_tokens(ids.unsqueeze(0))  # (1, T, C)
        cos, sin = self.inner.rotary_emb(h, positions)
        slots = torch.tensor([slot])
        starts = torch.zeros(1, dtype=torch.long)
        for i, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(i, layer, layer.input_layernorm(h), cos, sin)
            cache.write(i, slots, starts, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
            h = h + layer.self_attn.o_proj(y.transpose(1, 2).reshape(1, t, -1))
            h = self._mlp(i, layer, h)
        h = self.inner.norm(h[:, -1])
        return self.head(h)[0].float()

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (n,) last tokens of slots 0..n-1 at `positions` (n,) -> logits (n, V)."""
        if self.native is not None:
            return self.native(ids, positions, cache)
        n = ids.shape[0]
        length = int(positions.max()) + 1
        h = self.inner.embed_tokens(ids.unsqueeze(1))  # (n, 1, C)
        cos, sin = self.inner.rotary_emb(h, positions.unsqueeze(1))
        slots = torch.arange(n)
        # (n, 1, 1, L): slot i attends to positions 0..positions[i]
        mask = (torch.arange(length).unsqueeze(0) <= positions.unsqueeze(1)).view(n, 1, 1, length)
        for i, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(i, layer, layer.input_layernorm(h), cos, sin)
            cache.write(i, slots, positions, k, v)
            keys, values = cache.read(i, n, length, q.dtype)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            h = h + layer.self_attn.o_proj(y.transpose(1, 2).reshape(n, 1, -1))
            h = self._mlp(i, layer, h)
        h = self.inner.norm(h[:, 0])
        return self.head(h).float()
