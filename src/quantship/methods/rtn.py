"""RTN: round to nearest, optionally with an MSE-optimal clipping search per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..formats.grid import QuantizedWeight, group_view, quantize_weight
from ..formats.scheme import Scheme
from .registry import Method, register_method


@dataclass(frozen=True)
class RTNParams:
    clip_search: bool = False  # search a per-group range shrink minimising weight MSE
    clip_grid: int = 20  # candidate ratios between 1.0 and clip_min
    clip_min: float = 0.5

    def __post_init__(self) -> None:
        if self.clip_grid < 2:
            raise ValueError(f"clip_grid must be at least 2, got {self.clip_grid}")
        if not 0.0 < self.clip_min < 1.0:
            raise ValueError(f"clip_min must be in (0, 1), got {self.clip_min}")


def best_clip_ratio(scheme: Scheme, w: torch.Tensor, grid: int, clip_min: float,
                    error: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-group range shrink r among `grid` ratios from 1.0 down to clip_min that minimises
    error(W - Q(W; r)) -> (G0, G1); the one search RTN, AWQ and GPTQ share, each with its error."""
    best_err, best_ratio = None, None
    for ratio in torch.linspace(1.0, clip_min, grid).tolist():
        err = error(w - quantize_weight(scheme, w, ratio).dequantize())
        if best_err is None:
            best_err, best_ratio = torch.full_like(err, float("inf")), torch.ones_like(err)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def clip_search(w: torch.Tensor, scheme: Scheme, params: RTNParams) -> torch.Tensor:
    """Per-group ratio r in [clip_min, 1] minimising ||W - Q(W; r)||^2. -> (G0, G1) ratios."""
    w = w.detach().float()
    return best_clip_ratio(scheme, w, params.clip_grid, params.clip_min,
                           lambda d: group_view(d, scheme).pow(2).sum(dim=-1))


def rtn_quantize_weight(w: torch.Tensor, scheme: Scheme, params: RTNParams) -> QuantizedWeight:
    clip = clip_search(w, scheme, params) if params.clip_search else 1.0
    return quantize_weight(scheme, w, clip)


register_method(Method(
    name="rtn",
    params_cls=RTNParams,
    needs_calibration=False,
    quantize_weight=rtn_quantize_weight,
    description="round to nearest (optionally with an MSE clipping search)",
))
