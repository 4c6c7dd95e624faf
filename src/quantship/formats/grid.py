"""Value grids: how codes map to real numbers, per format kind.

A quantized weight W (out, in) is stored as codes (out, in) plus per-group parameters:
    int, symmetric:   W ≈ (q - 2**(b-1)) * scale          q in [0, 2**b); extreme -> q = 0
    int, asymmetric:  W ≈ q * scale + offset              offset = the group's (clipped) min
    nf4:              W ≈ NF4[q] * scale                  scale = group absmax
    fp8:              W ≈ e4m3(q) * scale                 scale = row absmax / 448
scale/offset have shape (out, n_groups): n_groups = in // group for "group", 1 for
"channel"; (1, 1) for "tensor". Methods (RTN, GPTQ, HQQ...) choose scale/offset/codes;
this module only defines the grids. The asymmetric form (scale + min, both fp16) is the
layout of llama.cpp's Q4_1, so a Q4_1 source is reproduced exactly by w4g32-asym.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheme import Scheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _nf4_codebook() -> torch.Tensor:
    # QLoRA's NormalFloat: quantiles of N(0, 1), 8 positive and 7 negative levels plus an
    # exact zero, normalised to [-1, 1]. 0.9677 = the paper's offset (avoids infinite quantiles).
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((pos, torch.zeros(1, dtype=torch.float64), neg)).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


NF4_CODEBOOK = _nf4_codebook()


@dataclass
class QuantizedWeight:
    """Unpacked result of quantizing one weight matrix; the format layer packs it."""

    scheme: Scheme
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, n_groups) float32
    offset: torch.Tensor | None  # (out, n_groups) float32, asymmetric int only
    act_scale: torch.Tensor | None = None  # (1,) float32: static per-tensor activation scale (w8a8 only)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.scheme, self.codes, self.scale, self.offset)


def group_view(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """(out, in) -> (out | 1, n_groups, group_len): the axis the scale is shared over is last."""
    out_f, in_f = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, out_f * in_f)
    if scheme.granularity == "channel":
        return w.reshape(out_f, 1, in_f)
    if in_f % scheme.group_size:
        raise ValueError(f"group size {scheme.group_size} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // scheme.group_size, scheme.group_size)


def params_from_range(
    scheme: Scheme, w_min: torch.Tensor, w_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scale/offset that map [w_min, w_max] (per group) onto the scheme's grid, in fp16 precision."""
    eps = torch.finfo(torch.float16).tiny
    if scheme.kind == "fp8":
        absmax = torch.maximum(w_min.abs(), w_max.abs())
        return (absmax / FP8_MAX).clamp_min(1e-12), None  # fp8 scales are kept in fp32
    if scheme.kind == "nf4":
        absmax = torch.maximum(w_min.abs(), w_max.abs())
        return _fp16(absmax.clamp_min(eps)), None
    if scheme.symmetric:
        # As llama.cpp's Q4_0: the group's signed extreme maps exactly onto the lowest code
        # (-2**(b-1)), so all 2**b levels are used; the scale is negative when the extreme is positive.
        extreme = torch.where(w_max.abs() >= w_min.abs(), w_max, w_min)
        scale = extreme / -(1 << (scheme.bits - 1))
        scale = torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)
        return _fp16(scale), None
    levels = (1 << scheme.bits) - 1
    scale = _fp16(((w_max - w_min) / levels).clamp_min(eps))
    return scale, _fp16(w_min)


def quantize_groups(
    scheme: Scheme, w_groups: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """Nearest code for each weight. w_groups (G0, G1, L); scale/offset (G0, G1) -> codes uint8."""
    s = scale.unsqueeze(-1)
    if scheme.kind == "fp8":
        return (w_groups / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    if scheme.kind == "nf4":
        x = (w_groups / s).clamp(-1.0, 1.0)
        boundaries = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
        return torch.bucketize(x, boundaries).to(torch.uint8)
    levels = (1 << scheme.bits) - 1
    if scheme.symmetric:
        q = torch.round(w_groups / s) + (1 << (scheme.bits - 1))
    else:
        q = torch.round((w_groups - offset.unsqueeze(-1)) / s)
    return q.clamp(0, levels).to(torch.uint8)


def decode_groups(
    scheme: Scheme, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """codes (G0, G1, L) -> float32 values, the inverse of quantize_groups on the grid."""
    s = scale.float().unsqueeze(-1)
    if scheme.kind == "fp8":
        return codes.view(torch.float8_e4m3fn).float() * s
    if scheme.kind == "nf4":
        return NF4_CODEBOOK[codes.long()] * s
    if scheme.symmetric:
        return (codes.float() - (1 << (scheme.bits - 1))) * s
    return codes.float() * s + offset.float().unsqueeze(-1)


def dequantize(
    scheme: Scheme, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """codes (out, in) + params -> float32 weight (out, in)."""
    shape = codes.shape
    groups = group_view(codes, scheme)
    return decode_groups(scheme, groups, scale, offset).reshape(shape)


def quantize_weight(scheme: Scheme, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest onto the scheme's grid with the range shrunk by `clip` (per group or scalar)."""
    w = w.detach().float()
    groups = group_view(w, scheme)
    w_min = groups.amin(dim=-1) * clip
    w_max = groups.amax(dim=-1) * clip
    scale, offset = params_from_range(scheme, w_min, w_max)
    codes = quantize_groups(scheme, groups, scale, offset).reshape(w.shape)
    return QuantizedWeight(scheme, codes, scale, offset)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    # Scales are stored as fp16; choose codes against the value that will actually be stored.
    return t.clamp(-65504.0, 65504.0).to(torch.float16).float()
