"""The decode step's layer loop as one native call per layer (quantship/native/csrc/decode_layer.cpp).

`NativeDecode.build(forward, cache)` describes each layer's norms and projections to the native
op once (which kernel multiplies each projection, with which tensors) and returns None and the
reason when something has no native form (a family whose table entry says so, such as gemma3; an
activation other than SiLU, a projection that only the reference path can multiply, an fp8 KV
cache, no AVX2 compiler): the engine then keeps the Python decode, which computes the same thing
with ~70 torch operators per layer.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch import nn

from .. import native
from ..formats.linear import QuantLinear

log = logging.getLogger(__name__)

_EMPTY = torch.empty(0)


class LinearKind(enum.IntEnum):  # must match decode_layer.cpp
    DENSE = 0
    INT8 = 1
    W8A8 = 2
    INT4 = 3


class Unsupported(Exception):
    """This model or cache has no native decode form; the message says why."""


def _f32(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t.detach().float().contiguous()


def describe_linear(module: nn.Module) -> tuple[LinearKind, int, list[torch.Tensor]]:
    """-> (kind, group size, [a, b, bias, extra]) for the native op, from the kernel chosen for the layer."""
    if type(module) is nn.Linear:
        return LinearKind.DENSE, 0, [_f32(module.weight), _EMPTY, _f32(module.bias), _EMPTY]
    if isinstance(module, QuantLinear):
        s, name = module.kernel_state, module.kernel_name
        if name == "int8_native":
            return LinearKind.INT8, 0, [s["w_int8"], s["scales_f32"], _f32(s["bias_f32"]), _EMPTY]
        if name == "int4_native":
            offsets = module.offsets if module.offsets is not None else _EMPTY
            return LinearKind.INT4, module.scheme.group_size, [s["w_int4"], module.scales, _f32(s["bias_f32"]), offsets]
        if name == "w8a8_int8_int_mm":
            return LinearKind.W8A8, 0, [s["w_int8_t"], s["scales"], _f32(s["bias"]), _f32(module.act_scale)]
        raise Unsupported(f"{module.scheme.name} projections use the reference path (kernel {name!r})")
    raise Unsupported(f"a {type(module).__name__} projection has no native form")


def _group(modules: list[nn.Module]) -> tuple[list[int], list[torch.Tensor]]:
    spec, tensors = [len(modules)], []
    for m in modules:
        kind, group, ts = describe_linear(m)
        spec += [int(kind), group]
        tensors += ts
    return spec, tensors


class NativeDecode:
    def __init__(self, forward, layers: list[tuple[list, list, list]]):
        self.forward, self.layers = forward, layers

    @classmethod
    def build(cls, forward, cache) -> "tuple[NativeDecode | None, str | None]":
        """-> (the native decode, None), or (None, why the Python decode is kept), the reason logged once."""
        try:
            _check(forward, cache)
            return cls(forward, [_describe_layer(forward, i) for i in range(len(forward.layers))]), None
        except Unsupported as e:
            log.info("native decode not used: %s", e)
            return None, str(e)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        f = self.forward
        h = f.embed(ids).float().contiguous()  # (n, C)
        cos, sin = f.rope(h.unsqueeze(1), positions.unsqueeze(1))[None]
        cos, sin = cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()  # (n, hs)
        positions = positions.contiguous()
        scales = getattr(cache, "k_scale", None)
        for i, (norms, tensors, spec) in enumerate(self.layers):
            torch.ops.quantship.decode_layer(
                h, cos, sin, positions, cache.k[i], cache.v[i],
                scales[i] if scales else _EMPTY, cache.v_scale[i] if scales else _EMPTY,
                norms, tensors, spec, f.n_heads, f.n_kv, f.eps, f.scaling)
        return f.logits(h)


def _check(forward, cache) -> None:
    """Raise Unsupported when the model, cache or machine has no native decode."""
    cfg = forward.model.config
    if forward.engine_facts.native_decode_unsupported:
        raise Unsupported(forward.engine_facts.native_decode_unsupported)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r} (native decode has SiLU)")
    if cache.kind not in ("float32", "bfloat16", "int8"):
        raise Unsupported(f"KV cache {cache.kind!r} (native decode reads float32, bfloat16, int8)")
    if not native.available():
        raise Unsupported(native.unavailable_reason())


def _describe_layer(forward, i: int) -> tuple[list, list, list]:
    b = forward.blocks[i]
    qk = (b.q_norm.weight, b.k_norm.weight) if b.q_norm is not None else (None, None)
    norms = [_f32(b.attn_norm.weight), _f32(b.mlp_norm.weight), _f32(qk[0]), _f32(qk[1])]
    spec, tensors = [], []
    qkv = [forward.qkv[i]] if forward.qkv[i] is not None else [b.q, b.k, b.v]
    gate_up = [forward.gate_up[i]] if forward.gate_up[i] is not None else [b.gate, b.up]
    for group in (qkv, [b.o], gate_up, [b.down]):
        s, t = _group(group)
        spec += s
        tensors += t
    return norms, tensors, spec
