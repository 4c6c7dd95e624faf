"""Preallocated KV cache: one slot per running request, float, int8 or fp8 (e4m3) storage.

Layout per layer: K and V of shape (slots, kv_heads, max_seq, head_dim). int8 and fp8 storage keep a
float16 absmax scale per (slot, head, position) (per token and head: a new token never rescales the
old ones): memory per token is layers x kv_heads x (head_dim + 2) x 2 bytes instead of
x head_dim x 2 x 4 (fp32) or x 2 (bf16).
Running requests occupy slots 0..n-1 (the engine compacts on finish), so a decode step reads
contiguous slices.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8,
             "fp8": torch.float8_e4m3fn}
# Scaled kinds: largest code magnitude (the absmax maps to it)
SCALED_MAX = {"int8": 127.0, "fp8": 448.0}


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int, kind: str = "float32"):
        if kind not in KV_DTYPES:
            raise ValueError(f"unknown kv cache kind {kind!r}; valid: {', '.join(KV_DTYPES)}")
        self.kind, self.layers, self.slots, self.max_seq = kind, layers, slots, max_seq
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (slots, kv_heads, max_seq, head_dim)
        dtype = KV_DTYPES[kind]
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(layers)]
        if kind in SCALED_MAX:
            self.k_scale = [torch.ones(shape[:-1] + (1,), dtype=torch.float16) for _ in range(layers)]
            self.v_scale = [torch.ones(shape[:-1] + (1,), dtype=torch.float16) for _ in range(layers)]

    def bytes_per_token(self) -> int:
        elem = torch.tensor([], dtype=KV_DTYPES[self.kind]).element_size()
        per_head = self.head_dim * elem + (2 if self.kind in SCALED_MAX else 0)  # + fp16 scale
        return self.layers * self.kv_heads * per_head * 2

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v (n, kv_heads, T, head_dim) for slot[i] at positions[i] .. positions[i]+T-1."""
        t = k.shape[2]
        for store, scale_store, x in ((self.k, getattr(self, "k_scale", None), k),
                                      (self.v, getattr(self, "v_scale", None), v)):
            if t == 1:  # decode: one position per slot, scattered in one indexing op
                idx = (slots, slice(None), positions)
                if scale_store is None:
                    store[layer][idx] = x[:, :, 0].to(store[layer].dtype)
                else:
                    q, s = _quantize(x[:, :, 0], self.kind)
                    store[layer][idx] = q
                    scale_store[layer][idx] = s
            else:
                for i in range(len(slots)):
                    sl = (int(slots[i]), slice(None), slice(int(positions[i]), int(positions[i]) + t))
                    if scale_store is None:
                        store[layer][sl] = x[i].to(store[layer].dtype)
                    else:
                        q, s = _quantize(x[i], self.kind)
                        store[layer][sl] = q
                        scale_store[layer][sl] = s

    def read(self, layer: int, n: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots 0..n-1 over positions 0..length-1 as `dtype` (n, kv_heads, length, head_dim)."""
        k = self.k[layer][:n, :, :length]
        v = self.v[layer][:n, :, :length]
        if self.kind in SCALED_MAX:
            k = k.to(dtype) * self.k_scale[layer][:n, :, :length].to(dtype)
            v = v.to(dtype) * self.v_scale[layer][:n, :, :length].to(dtype)
            return k, v
        return k.to(dtype), v.to(dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst (compaction after a finish)."""
        stores = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.kind in SCALED_MAX else [])
        for store in stores:
            for layer in range(self.layers):
                store[layer][dst, :, :length] = store[layer][src, :, :length]


def _quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(head, position) absmax: x (..., head_dim) -> codes, float16 scale (..., 1)."""
    qmax = SCALED_MAX[kind]
    scale = (x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-4) / qmax).half()
    y = x / scale.float()
    if kind == "int8":
        return torch.round(y).clamp(-127, 127).to(torch.int8), scale
    return y.clamp(-qmax, qmax).to(torch.float8_e4m3fn), scale
