"""Fold a per-input-channel scale into a ScaleGroup, leaving the float function unchanged.

The predecessor's output channel j is divided by s_j and every consumer's input column j is
multiplied by s_j (AWQ, SmoothQuant). Norm predecessors scale weight and bias; Gemma's RMSNorm
computes x_hat * (1 + weight), so its weight becomes (1 + weight) / s - 1. Linear predecessors
scale their output rows and bias. GPT-2's Conv1D stores weights transposed (in, out).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchFacts, ScaleGroup


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]


@torch.no_grad()
def fold_input_scale(block: nn.Module, group: ScaleGroup, facts: ArchFacts, s: torch.Tensor) -> None:
    """Divide group.prev's output channels by s and multiply group.linears' input columns by s."""
    prev = block.get_submodule(group.prev)
    s = s.detach().float()
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"scale for {group.prev} must be finite and positive")
    if group.prev_kind == "norm":
        if prev.weight.shape[0] != s.shape[0]:
            raise ValueError(f"scale has {s.shape[0]} channels, norm {group.prev} has {prev.weight.shape[0]}")
        w = prev.weight.float()
        new = (w + facts.norm_weight_offset) / s - facts.norm_weight_offset
        prev.weight.copy_(new.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        if out_features(prev) != s.shape[0]:
            raise ValueError(f"scale has {s.shape[0]} channels, {group.prev} has {out_features(prev)} outputs")
        if _is_conv1d(prev):
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(0))
        else:
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        if _is_conv1d(lin):
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(1))
        else:
            if lin.weight.shape[1] != s.shape[0]:
                raise ValueError(f"scale has {s.shape[0]} channels, {name} has {lin.weight.shape[1]} inputs")
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))
