"""QuantLinear: a Linear layer that keeps packed codes + scales in memory.

Forward dequantizes this one layer's weight on the fly (reference path) so a loaded
quantized model never holds the whole model in float; `prepare_fast()` switches a layer to
a measured faster kernel from formats/kernels.py (serving), leaving evaluation exact.

Weight+activation schemes (w8a8) quantize the input to int8 at run time: per token (dynamic,
the default) or with one calibrated per-tensor scale (static) held in the optional `act_scale`
buffer; a layer without that buffer is dynamic. The buffer is saved with the layer and is
recreated on load when the state dict holds it, so artifacts round-trip either way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .grid import QuantizedWeight, dequantize
from .pack import pack_codes, packed_row_bytes, unpack_codes
from .scheme import Scheme, parse_scheme

class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: Scheme | str, *, bias: bool,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scheme = parse_scheme(scheme) if isinstance(scheme, str) else scheme
        self.in_features, self.out_features = in_features, out_features
        n_scales = self.scheme.scale_count(out_features, in_features)
        scale_shape = (1, 1) if self.scheme.granularity == "tensor" else (out_features, n_scales // out_features)
        scale_dtype = torch.float32 if self.scheme.kind == "fp8" else torch.float16
        self.register_buffer("qweight", torch.zeros(out_features, packed_row_bytes(in_features, self.scheme.bits),
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(scale_shape, dtype=scale_dtype))
        self.register_buffer("offsets", torch.zeros(scale_shape, dtype=torch.float16)
                             if not self.scheme.symmetric else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("act_scale", None)  # (1,) float32 when activations use a static scale
        self.compute_dtype = dtype
        self.kernel_state: dict = {}  # tensors owned by the fast kernel (e.g. repacked weights)
        self.kernel: Callable | None = None  # set by prepare_fast(); None = reference path
        self.kernel_name = "reference"

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None,
                       dtype: torch.dtype = torch.float32) -> "QuantLinear":
        out_f, in_f = qw.codes.shape
        layer = cls(in_f, out_f, qw.scheme, bias=bias is not None, dtype=dtype)
        codes = qw.codes ^ 0x80 if layer._twos_complement else qw.codes
        layer.qweight = pack_codes(codes, qw.scheme.bits)
        layer.scales = qw.scale.to(layer.scales.dtype).reshape(layer.scales.shape).contiguous()
        if qw.offset is not None:
            layer.offsets = qw.offset.to(torch.float16).reshape(layer.scales.shape).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(dtype).clone()
        if qw.act_scale is not None:
            layer.set_act_scale(qw.act_scale)
        return layer

    def set_act_scale(self, scale: torch.Tensor | float | None) -> None:
        """Use one static activation scale (w8a8: x_q = round(x / scale) in [-127, 127]); None = per token."""
        if scale is None:
            self.act_scale = None
            return
        if not self.scheme.act_bits:
            raise ValueError(f"scheme {self.scheme.name} quantizes no activations; a static act_scale needs w8a8")
        t = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).clone()
        if t.numel() != 1 or not torch.isfinite(t).all() or t.item() <= 0:
            raise ValueError(f"act_scale must be one finite positive number, got {t.tolist()}")
        self.act_scale = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The optional static activation scale exists only in artifacts that have it.
        if self.act_scale is None and prefix + "act_scale" in state_dict:
            self.act_scale = torch.ones(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def _twos_complement(self) -> bool:
        # 8-bit symmetric codes are stored as two's-complement int8 bytes (code - 128), so an
        # int8 kernel can use the buffer as is (a zero-copy view) instead of keeping a second copy.
        return self.scheme.kind == "int" and self.scheme.bits == 8 and self.scheme.symmetric

    def codes(self) -> torch.Tensor:
        if self.qweight.numel() == 0 and self.out_features:
            raise RuntimeError("this layer's codes were released by prepare_fast(release_codes=True); "
                               "it can run forward but not be saved or dequantized")
        codes = unpack_codes(self.qweight, self.scheme.bits, self.in_features)
        return codes ^ 0x80 if self._twos_complement else codes

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer represents."""
        offsets = self.offsets.float() if self.offsets is not None else None
        return dequantize(self.scheme, self.codes(), self.scales.float(), offsets)

    @property
    def weight(self) -> torch.Tensor:
        # Read-only float view for code that inspects `.weight` (e.g. dtype/device probes).
        return self.dequantize().to(self.compute_dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets, self.act_scale)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact reference unless prepare_fast() chose a kernel: evaluation stays bit-faithful
        # to the stored grid, serving opts in to speed.
        if self.kernel is not None:
            y = self.kernel(self, x)
            if y is not None:
                return y
        return self.reference_forward(x)

    def prepare_fast(self, *, release_codes: bool = False) -> str:
        """Pick the fastest registered kernel for this layer (see formats/kernels.py); returns its name.

        release_codes drops the packed codes when the kernel keeps its own copy (inference-only layer)."""
        from .kernels import select_kernel

        name, kernel = select_kernel(self)
        self.kernel, self.kernel_name = kernel, name
        if kernel is not None and release_codes and self.kernel_state.get("owns_weights"):
            self.qweight = torch.empty(0, dtype=torch.uint8)
        return name

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(self.fake_quantize_input(x), w, self.bias.to(x.dtype) if self.bias is not None else None)

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as this layer's integer activations see it, dequantized; x itself for weight-only schemes."""
        if not self.scheme.act_bits:
            return x
        static = self.act_scale.to(x.dtype) if self.act_scale is not None else None
        codes, scale = quantize_activations(x, self.scheme.act_bits, static)
        return codes * scale

    def extra_repr(self) -> str:
        act = ", act=static" if self.act_scale is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}{act}"


def quantize_activations(x: torch.Tensor, bits: int, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation quantization -> (integer codes held as floats, scale): one calibrated
    scale (static w8a8), or per token from its absmax when static_scale is None (dynamic).
    The single definition shared by the reference path, evaluation's fast path and the int8 kernel."""
    qmax = (1 << (bits - 1)) - 1
    scale = static_scale if static_scale is not None else x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale
