"""Fold a per-input-channel scale into a ScaleGroup, leaving the float function unchanged.

The predecessor's output channel j is divided by s_j and every consumer's input column j is
multiplied by s_j (AWQ, SmoothQuant). Norm predecessors scale weight and bias; Gemma's RMSNorm
computes x_hat * (1 + weight), so its weight becomes (1 + weight) / s - 1. Linear predecessors
scale their output rows and bias. GPT-2's Conv1D stores weights transposed (in, out).

Grouped-query attention: o_proj's input column (h, d) reads v_proj's output row
(h // n_rep, d), each KV head being repeated for n_rep = heads / kv_heads query heads. A scale
for the v_proj -> o_proj group therefore has v_proj's out size (kv_heads * head_dim) and is
expanded per head group for o_proj's columns (`consumer_layout`, `expand_to_consumer`); a
statistic measured on o_proj's input folds back with `reduce_to_prev` (max over the copies).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchFacts, ScaleGroup, is_transposed


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_transposed(module) else module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def prev_channels(block: nn.Module, group: ScaleGroup) -> int:
    """Number of channels of group.prev's output = the size a scale for this group must have."""
    prev = block.get_submodule(group.prev)
    return prev.weight.shape[0] if group.prev_kind == "norm" else out_features(prev)


def consumer_layout(block: nn.Module, group: ScaleGroup, consumer: str) -> tuple[int, int]:
    """-> (n_rep, head_dim): how a consumer's input columns repeat prev's channels.

    (1, channels) when they match one to one; (heads / kv_heads, head_dim) for GQA's
    v_proj -> o_proj, head_dim read from the attention module that owns prev."""
    n_prev = prev_channels(block, group)
    n_in = in_features(block.get_submodule(consumer))
    if n_in == n_prev:
        return 1, n_prev
    parent_name = group.prev.rpartition(".")[0]
    head_dim = getattr(block.get_submodule(parent_name), "head_dim", None) if parent_name else None
    if group.prev_kind != "linear" or head_dim is None or n_in % n_prev or n_prev % head_dim:
        raise ValueError(
            f"cannot fold a scale of {group.prev} ({n_prev} channels) into {consumer} ({n_in} inputs): "
            f"the sizes differ and it is not grouped-query attention with a known head_dim")
    return n_in // n_prev, head_dim


def group_layout(block: nn.Module, group: ScaleGroup) -> tuple[int, int]:
    """The (n_rep, head_dim) layout that all of group.linears share; ValueError if they differ."""
    layouts = {consumer_layout(block, group, name) for name in group.linears}
    if len(layouts) != 1:
        raise ValueError(f"the linears fed by {group.prev} ({', '.join(group.linears)}) see its channels "
                         f"in different layouts {sorted(layouts)}; one scale cannot serve them")
    return layouts.pop()


def expand_to_consumer(s: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """(kv_heads * head_dim,) -> (kv_heads * n_rep * head_dim,): repeat each KV head's block n_rep times."""
    if n_rep == 1:
        return s
    return s.reshape(-1, 1, head_dim).expand(-1, n_rep, head_dim).reshape(-1)


def reduce_to_prev(v: torch.Tensor, n_rep: int, head_dim: int, how: str = "max") -> torch.Tensor:
    """Inverse layout of expand_to_consumer for a per-column statistic: max (or mean) over the n_rep copies."""
    if n_rep == 1:
        return v
    copies = v.reshape(-1, n_rep, head_dim)
    return (copies.amax(dim=1) if how == "max" else copies.mean(dim=1)).reshape(-1)


@torch.no_grad()
def fold_input_scale(block: nn.Module, group: ScaleGroup, facts: ArchFacts, s: torch.Tensor) -> None:
    """Divide group.prev's output channels by s and multiply group.linears' input columns by s.

    s has group.prev's output size; for GQA's v_proj -> o_proj it is expanded per head group."""
    prev = block.get_submodule(group.prev)
    s = s.detach().float()
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"scale for {group.prev} must be finite and positive")
    if s.dim() != 1 or s.shape[0] != prev_channels(block, group):
        raise ValueError(f"scale has shape {tuple(s.shape)}, {group.prev} has {prev_channels(block, group)} "
                         f"output channels")
    layouts = {name: consumer_layout(block, group, name) for name in group.linears}  # validate before changing
    if group.prev_kind == "norm":
        w = prev.weight.float()
        new = (w + facts.norm_weight_offset) / s - facts.norm_weight_offset
        prev.weight.copy_(new.to(prev.weight.dtype))
    elif is_transposed(prev):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(0))
    else:
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        s_in = expand_to_consumer(s, *layouts[name]).to(lin.weight.dtype)
        if is_transposed(lin):
            lin.weight.mul_(s_in.unsqueeze(1))
        else:
            lin.weight.mul_(s_in.unsqueeze(0))
