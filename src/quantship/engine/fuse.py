"""Fuse projections that read the same input (q/k/v, gate/up) into one quantized matmul.

One kernel call instead of three (or two) per layer: fewer activation conversions and
dispatches, and one larger matrix that streams better. Only QuantLinear layers of the same
channel- or group-wise scheme fuse (their rows simply stack); float layers are left alone,
since fusing them would copy the weights.
"""

from __future__ import annotations

import torch

from ..formats.grid import QuantizedWeight
from ..formats.linear import QuantLinear


def fuse_quant_linears(layers: list) -> QuantLinear | None:
    """-> one prepared QuantLinear computing cat([l(x) for l in layers], -1), or None if they cannot fuse."""
    if not all(isinstance(l, QuantLinear) for l in layers):
        return None
    first = layers[0]
    if any(l.scheme != first.scheme or l.in_features != first.in_features for l in layers):
        return None
    if first.scheme.granularity == "tensor" or first.scheme.act_bits or first.qweight.numel() == 0:
        return None
    offsets = None
    if first.offsets is not None:
        offsets = torch.cat([l.offsets.float() for l in layers])
    qw = QuantizedWeight(first.scheme, torch.cat([l.codes() for l in layers]),
                         torch.cat([l.scales.float() for l in layers]), offsets)
    bias = None
    if any(l.bias is not None for l in layers):
        bias = torch.cat([l.bias if l.bias is not None else torch.zeros(l.out_features) for l in layers])
    fused = QuantLinear.from_quantized(qw, bias, dtype=first.compute_dtype)
    if fused.prepare_fast(release_codes=True) == "reference":
        return None  # no kernel for this scheme: fusing would only cost memory
    for layer in layers:  # the engine owns the model: drop the unfused copies
        layer.qweight = torch.empty(0, dtype=torch.uint8)
    return fused
