"""Fast CPU kernels for QuantLinear, chosen per layer from a preference-ordered table (KERNELS).

Preferred: quantship's native AVX2 kernels (quantship/native, built by `make setup`), then torch's
own. On a 2-core AVX2 EPYC (docs/results/kernels.md, benchmarks/kernels.py):
batch-1 GEMV of a 1536x576 layer, cold caches (60 distinct layers cycled), median of repeats:
    fp32 F.linear                                               ~370 us
    int8: native (fp32 activations)        ~91 us | torch _weight_int8pack_mm (bf16 act.)  ~173 us
    int4 g32: native (int8-rounded act.)   ~70 us | torch _weight_int4pack_mm_for_cpu      ~100 us
Decode is bound by bytes read, so the integer kernels win by roughly their compression. The
native int8 kernel is exact up to fp32 summation order; torch's kernels run bf16 activations and
the native int4 kernel rounds activations to int8 per 32 (as llama.cpp does): they trade exactness
with the reference path for speed, which is why QuantLinear uses them only after prepare_fast().
Many rows (prefill) dequantize the layer once and run the dense fp32 GEMM instead
(INT8_DENSE_MIN_ROWS, INT4_DENSE_MIN_ROWS). Other formats (int2/3, nf4, fp8, per-tensor) keep the
reference dequantize-then-matmul path.

w8a8 (int8 weights x int8 activations) really multiplies in int8: activations are quantized
per token (or with the layer's static scale) exactly as the reference does, multiplied with
torch._int_mm (int8 x int8 -> int32; runs on CPU in torch 2.13 for every M >= 1, K and N
as here, no padding needed) against the stored two's-complement weight bytes, then rescaled by
act_scale x weight scale in fp32. The integer products are exact, so it matches the reference
up to fp32 summation order. torch 2.13's CPU _int_mm is an unvectorised loop (~1 GOP/s here):
measured on one thread, 1536x576, it beats the reference (dequantize + fake-quant + fp32 matmul)
at M = 1 (669 vs 966 us), ties at M = 2 and loses from M = 4 on (2.7 vs 1.5 ms; 90 vs 9 ms at
M = 64), so the kernel takes rows <= W8A8_INT_MM_MAX_ROWS and hands larger inputs back to the
reference path (docs/results/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .linear import quantize_activations

KernelFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor | None]


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


# From this many rows on (prefill), dequantizing the int8 weight once and running the dense fp32
# GEMM beats the int8 GEMV kernel, whose cost grows linearly in rows. Measured on a 2-core AVX2
# EPYC (40 distinct layers cycled, median of 7; docs/bench.md): int8pack / (dequantize + fp32)
# time = 0.75-1.22 at 32 rows, 1.13-1.69 at 64, 1.42-2.02 at 128 over the four layer shapes.
INT8_DENSE_MIN_ROWS = 64


def _int8_weight_only(layer, x: torch.Tensor) -> torch.Tensor:
    state = layer.kernel_state
    x2 = x.reshape(-1, layer.in_features)
    if x2.shape[0] >= INT8_DENSE_MIN_ROWS:
        w = state["w_int8"].to(torch.float32).mul_(state["scales_f32"].unsqueeze(1))
        y = torch.nn.functional.linear(x2.to(torch.float32), w, state["bias_f32"])
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
    y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), state["w_int8"], state["scales"])  # (M, N)
    if layer.bias is not None:
        y = y + state["bias"]
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _int8_native(layer, x: torch.Tensor) -> torch.Tensor:
    state = layer.kernel_state
    x2 = x.reshape(-1, layer.in_features)
    if x2.shape[0] >= INT8_DENSE_MIN_ROWS:
        return _int8_weight_only(layer, x)  # prefill: dequantize once + dense GEMM
    y = torch.ops.quantship.int8_linear(x2.to(torch.float32).contiguous(), state["w_int8"], state["scales_f32"],
                                        state["bias_f32"])
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _native_ok(layer) -> bool:
    from .. import native

    return layer.in_features % 32 == 0 and native.available()


def _prepare_int8_native(layer) -> None:
    layer.kernel_state.update(
        w_int8=layer.qweight.view(torch.int8),  # two's-complement storage: zero-copy
        scales_f32=layer.scales.reshape(-1).float(),
        bias_f32=layer.bias.float() if layer.bias is not None else None,
        owns_weights=False,
    )


def _prepare_int8(layer) -> None:
    _prepare_int8_native(layer)  # the codes view and fp32 scale/bias (dense prefill path), plus bf16 copies:
    layer.kernel_state.update(
        scales=layer.scales.reshape(-1).to(torch.bfloat16),
        bias=layer.bias.to(torch.bfloat16) if layer.bias is not None else None,
    )


def _int4_group(layer, x: torch.Tensor) -> torch.Tensor:
    state = layer.kernel_state
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(x2, state["w_int4"], layer.scheme.group_size, state["scales_zeros"])
    if layer.bias is not None:
        y = y + state["bias"]
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


# From this many rows on (prefill) the native int4 path dequantizes the layer once and runs the
# dense fp32 GEMM: measured on the three layer shapes of the default model (2-core AVX2 EPYC, cold
# caches), native int4 / (dequantize + fp32) = 0.5-0.85 at 16 rows, 0.9-1.2 at 32, 1.3-2.0 at 64.
INT4_DENSE_MIN_ROWS = 32


def _int4_native(layer, x: torch.Tensor) -> torch.Tensor:
    state, g = layer.kernel_state, layer.scheme.group_size
    x2 = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()
    if x2.shape[0] >= INT4_DENSE_MIN_ROWS:
        w = torch.ops.quantship.int4_dequantize(state["w_int4"], layer.scales, layer.offsets, g)
        y = torch.nn.functional.linear(x2, w, state["bias_f32"])
    else:
        y = torch.ops.quantship.int4_linear(x2, state["w_int4"], layer.scales, layer.offsets, state["bias_f32"], g)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _prepare_int4_native(layer) -> None:
    from ..native import pack_int4_blocks

    layer.kernel_state.update(
        w_int4=pack_int4_blocks(layer.codes()),  # 32-code blocks; scales and offsets are used as stored
        bias_f32=layer.bias.float() if layer.bias is not None else None,
        owns_weights=True,  # a repacked copy: the packed codes may be released
    )


def _prepare_int4(layer) -> None:
    # torch's int4 kernel computes W = (q - 8) * scale + zero per group:
    # symmetric: zero = 0; asymmetric (W = q * scale + offset): zero = offset + 8 * scale.
    codes = layer.codes().to(torch.int32)  # (N, K)
    scales = layer.scales.float()  # (N, K/g)
    zeros = layer.offsets.float() + 8 * scales if layer.offsets is not None else torch.zeros_like(scales)
    layer.kernel_state.update(
        w_int4=torch._convert_weight_to_int4pack_for_cpu(codes, 2),
        scales_zeros=torch.stack((scales.t(), zeros.t()), dim=-1).contiguous().to(torch.bfloat16),  # (K/g, N, 2)
        bias=layer.bias.to(torch.bfloat16) if layer.bias is not None else None,
        owns_weights=True,  # a repacked copy: the packed codes may be released
    )


W8A8_INT_MM_MAX_ROWS = 2


def _w8a8_int(layer, x: torch.Tensor) -> torch.Tensor | None:
    state = layer.kernel_state
    x2 = x.reshape(-1, layer.in_features).float()
    if x2.shape[0] > state["max_rows"]:
        return None  # the reference path is faster for more rows (see the module docstring)
    codes, x_scale = quantize_activations(x2, 8, layer.act_scale)  # the reference's codes; (1,) or (M, 1)
    acc = torch._int_mm(codes.to(torch.int8), state["w_int8_t"])  # (M, N) int32, exact
    y = acc.float().mul_(x_scale).mul_(state["scales"])
    if layer.bias is not None:
        y = y.add_(state["bias"])
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _prepare_w8a8(layer) -> None:
    layer.kernel_state.update(
        w_int8_t=layer.qweight.view(torch.int8).t(),  # (K, N) view of the two's-complement codes: zero-copy
        scales=layer.scales.reshape(1, -1).float(),
        bias=layer.bias.float() if layer.bias is not None else None,
        max_rows=W8A8_INT_MM_MAX_ROWS,
        owns_weights=False,
    )


def _is_int8_weight_only(layer) -> bool:
    s = layer.scheme
    return s.kind == "int" and s.bits == 8 and s.symmetric and s.granularity == "channel" and not s.act_bits


def _is_w8a8(layer) -> bool:
    s = layer.scheme
    return s.kind == "int" and s.bits == 8 and s.symmetric and s.granularity == "channel" and s.act_bits == 8


def _is_int4_group(layer) -> bool:
    s = layer.scheme
    return s.kind == "int" and s.bits == 4 and s.granularity == "group" and s.group_size in (32, 64, 128, 256) \
        and layer.in_features % s.group_size == 0


@dataclass(frozen=True)
class Kernel:
    name: str
    applies: Callable[[torch.nn.Module], bool]  # the layer's scheme/shape is one this kernel multiplies
    available: Callable[[torch.nn.Module], bool]  # ... and it can run here (native build, torch op present)
    prepare: Callable[[torch.nn.Module], None]  # fills layer.kernel_state
    forward: KernelFn


# In order of preference: the first kernel that applies and is available wins.
KERNELS = (
    Kernel("int8_native", _is_int8_weight_only, _native_ok, _prepare_int8_native, _int8_native),
    Kernel("int8_weight_only", _is_int8_weight_only, lambda _: _has_op("_weight_int8pack_mm"), _prepare_int8,
           _int8_weight_only),
    Kernel("w8a8_int8_int_mm", _is_w8a8, lambda _: _has_op("_int_mm"), _prepare_w8a8, _w8a8_int),
    Kernel("int4_native", _is_int4_group, _native_ok, _prepare_int4_native, _int4_native),
    Kernel("int4_group", _is_int4_group, lambda _: _has_op("_weight_int4pack_mm_for_cpu"), _prepare_int4,
           _int4_group),
)


def select_kernel(layer) -> tuple[str, KernelFn | None]:
    """-> (kernel name, fn) for a QuantLinear; ("reference", None) when no fast kernel applies."""
    for kernel in KERNELS:
        if kernel.applies(layer) and kernel.available(layer):
            kernel.prepare(layer)
            return kernel.name, kernel.forward
    return "reference", None


def prepare_model(model: torch.nn.Module, *, release_codes: bool = False) -> dict[str, int]:
    """Switch every QuantLinear of a model to its fast kernel. -> {kernel name: layer count}."""
    from .linear import QuantLinear

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if module.qweight.numel() == 0 and module.kernel is None:
                continue  # fused into another layer by the engine: nothing left to prepare
            name = module.prepare_fast(release_codes=release_codes)
            counts[name] = counts.get(name, 0) + 1
    return counts
