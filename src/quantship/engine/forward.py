"""Our own forward pass for the decoder families the engine runs, reading the HF model's modules.

Which modules to call comes from the architecture table (models/arch.py): the branches give the
norms and the attention / MLP tails, the groups the linears each norm feeds (q, k, v; gate, up),
the entry's EngineFacts the embedding, rotary and final norm and the family's switches (one rope
per layer type, sliding-window layers). Norms, the embedding (with its scaling) and the activation
are the model's own modules, so their exact math (Gemma's (1 + w) RMSNorm, GELU-tanh) is
transformers'. Projections are called as modules, so a QuantLinear (and its fast kernel) plugs in
unchanged; rotary embeddings come from the model's own rotary module (so rope scaling is honoured
exactly as transformers implements it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import ArchFacts, EngineFacts, engine_facts
from .kv_cache import KVCache


@dataclass
class _Layer:
    """One decoder block's modules, resolved from the table once."""

    attn_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    attn_post_norm: nn.Module | None
    mlp_norm: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    mlp_post_norm: nn.Module | None
    act: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    rope: str | None  # layer type passed to a per-type rotary module (Gemma 3), else None
    window: int | None  # sliding window: a query at p sees keys at p - window + 1 .. p


def _resolve_layer(block: nn.Module, facts: ArchFacts, rope: str | None, window: int | None) -> _Layer:
    attn, mlp = facts.branches
    q, k, v = facts.fed_by(attn.pre_norm)
    gate, up = facts.fed_by(mlp.pre_norm)
    get = block.get_submodule
    qk = facts.qk_norm
    return _Layer(
        attn_norm=get(attn.pre_norm), q=get(q), k=get(k), v=get(v), o=get(attn.tail),
        attn_post_norm=get(attn.post_norm) if attn.post_norm else None,
        mlp_norm=get(mlp.pre_norm), gate=get(gate), up=get(up), down=get(mlp.tail),
        mlp_post_norm=get(mlp.post_norm) if mlp.post_norm else None,
        act=get(f"{mlp.body}.act_fn"),
        q_norm=get(qk[0]) if qk else None, k_norm=get(qk[1]) if qk else None,
        rope=rope, window=window)


def _check_engine_entry(facts: ArchFacts, model_type: str) -> None:
    if len(facts.branches) != 2 or len(facts.fed_by(facts.branches[0].pre_norm)) != 3 \
            or len(facts.fed_by(facts.branches[1].pre_norm)) != 2:
        raise ValueError(f"the ARCHITECTURES entry of {model_type!r} has engine facts but not the shape the "
                         f"engine runs: attention and MLP branches, q/k/v and gate/up fed by their norms")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


class DecoderForward:
    """Prefill one request / decode a batch of slots, writing K/V into a KVCache."""

    def __init__(self, model, head=None):
        self.model = model
        cfg = model.config
        self.facts, self.engine_facts = engine_facts(cfg.model_type)
        _check_engine_entry(self.facts, cfg.model_type)
        ef: EngineFacts = self.engine_facts
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("the engine decodes causally; this config sets use_bidirectional_attention")
        self.embed = model.get_submodule(ef.embed)
        self.rotary = model.get_submodule(ef.rotary)
        self.final_norm = model.get_submodule(ef.final_norm)
        self.layers = list(model.get_submodule(self.facts.blocks))
        types = list(getattr(cfg, "layer_types", None) or []) if (ef.rope_per_layer_type or ef.layer_windows) else []
        if types and len(types) < len(self.layers):
            raise ValueError(f"config.layer_types names {len(types)} layers, the model has {len(self.layers)}")
        self.layer_types = sorted(set(types))
        self.blocks = [
            _resolve_layer(block, self.facts, types[i] if ef.rope_per_layer_type else None,
                           cfg.sliding_window if ef.layer_windows and types[i] == "sliding_attention" else None)
            for i, block in enumerate(self.layers)]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.layers[0].get_submodule(self.facts.branches[0].body).scaling
        self.eps = _norm_eps(self.blocks[0].attn_norm)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.head = head if head is not None else model.get_submodule(ef.head)
        self.qkv: list = [None] * len(self.layers)  # fused (q, k, v) projections, set by fuse()
        self.gate_up: list = [None] * len(self.layers)
        self.native = None  # a NativeDecode (engine/native_decode.py) replacing decode's layer loop

    def fuse(self) -> int:
        """Fuse q/k/v and gate/up of quantized layers; -> number of fused groups."""
        from .fuse import fuse_quant_linears

        count = 0
        for i, b in enumerate(self.blocks):
            self.qkv[i] = fuse_quant_linears([b.q, b.k, b.v])
            self.gate_up[i] = fuse_quant_linears([b.gate, b.up])
            count += (self.qkv[i] is not None) + (self.gate_up[i] is not None)
        return count

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer type (one entry, key None, when the family has one rope)."""
        if not self.engine_facts.rope_per_layer_type:
            return {None: self.rotary(h, positions)}
        return {t: self.rotary(h, positions, t) for t in self.layer_types}

    def _attention_inputs(self, i, b: _Layer, x, cos, sin):
        bsz, t, _ = x.shape
        if self.qkv[i] is not None:
            q, k, v = self.qkv[i](x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                             self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = b.q(x), b.k(x), b.v(x)
        q = q.view(bsz, t, self.n_heads, self.head_dim)
        k = k.view(bsz, t, self.n_kv, self.head_dim)
        v = v.view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
        if b.q_norm is not None:
            q, k = b.q_norm(q), b.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, nh, T, hs), k/v (B, nkv, L, hs), mask (B|1, 1, T, L) bool or None (causal, T == L)."""
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    def _residual(self, h, y, post_norm):
        return h + (post_norm(y) if post_norm is not None else y)

    def _mlp(self, i, b: _Layer, h):
        x = b.mlp_norm(h)
        if self.gate_up[i] is not None:
            gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        else:
            gate, up = b.gate(x), b.up(x)
        return self._residual(h, b.down(b.act(gate) * up), b.mlp_post_norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.head(self.final_norm(h)).float()
        if self.final_softcap is not None:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """ids (T,) of one request -> logits (V,) of its last position; K/V land in `slot`."""
        t = ids.shape[0]
        positions = torch.arange(t).unsqueeze(0)
        h = self.embed(ids.unsqueeze(0))  # (1, T, C)
        rope = self.rope(h, positions)
        slots = torch.tensor([slot])
        starts = torch.zeros(1, dtype=torch.long)
        for i, (layer, b) in enumerate(zip(self.layers, self.blocks)):
            q, k, v = self._attention_inputs(i, b, b.attn_norm(h), *rope[b.rope])
            cache.write(i, slots, starts, k, v)
            mask = None if b.window is None or t <= b.window else _causal(t, t, b.window)
            y = self._attend(q, k, v, mask)
            h = self._residual(h, b.o(y.transpose(1, 2).reshape(1, t, -1)), b.attn_post_norm)
            h = self._mlp(i, b, h)
        return self.logits(h[:, -1])[0]

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (n,) last tokens of slots 0..n-1 at `positions` (n,) -> logits (n, V)."""
        if self.native is not None:
            return self.native(ids, positions, cache)
        n = ids.shape[0]
        length = int(positions.max()) + 1
        h = self.embed(ids.unsqueeze(1))  # (n, 1, C)
        rope = self.rope(h, positions.unsqueeze(1))
        slots = torch.arange(n)
        keys_at = torch.arange(length).unsqueeze(0)  # (1, L)
        # (n, 1, 1, L): slot i attends to positions 0..positions[i] (and only the last `window` of them)
        masks = {None: (keys_at <= positions.unsqueeze(1)).view(n, 1, 1, length)}
        for b in self.blocks:
            if b.window is not None and b.window not in masks:
                masks[b.window] = masks[None] & (keys_at > (positions - b.window).unsqueeze(1)).view(n, 1, 1, length)
        for i, (layer, b) in enumerate(zip(self.layers, self.blocks)):
            q, k, v = self._attention_inputs(i, b, b.attn_norm(h), *rope[b.rope])
            cache.write(i, slots, positions, k, v)
            keys, values = cache.read(i, n, length, q.dtype)
            y = self._attend(q, keys, values, masks[b.window])
            h = self._residual(h, b.o(y.transpose(1, 2).reshape(n, 1, -1)), b.attn_post_norm)
            h = self._mlp(i, b, h)
        return self.logits(h[:, 0])


def _causal(t: int, length: int, window: int) -> torch.Tensor:
    """(1, 1, T, L) bool: query j (at position L - T + j) sees keys at or before it, the last `window` of them."""
    rows = torch.arange(length - t, length).unsqueeze(1)
    cols = torch.arange(length).unsqueeze(0)
    return ((cols <= rows) & (cols > rows - window)).view(1, 1, t, length)
