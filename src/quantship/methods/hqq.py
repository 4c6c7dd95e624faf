"""HQQ (Badri & Shaji, 2023): calibration-free Half-Quadratic Quantization.

Minimise a sparsity-promoting error  phi(W - Q^-1(Q(W))) = ||.||_p^p  (p < 1: a few large
errors are cheap, many small ones are not; outliers stop dragging the grid) by half-quadratic
splitting with an auxiliary error variable W_e:

    min_{params, W_e}  ||W_e||_p^p + beta/2 ||W_e - (W - Q^-1(Q(W)))||^2

alternating two closed-form steps, with beta <- kappa * beta after each round:
    W_e    = shrink_lp(W - W_r, beta)    W_r = dequantized W, shrink_lp(x) = sign(x) relu(|x| - |x|^(p-1)/beta)
    params = least-squares fit of the codes to W - W_e  (per group; codes fixed)

Our grids (formats/grid.py) and what is optimised:
    int -asym  W ~ q * scale + offset       scale and offset (a 2-parameter line fit per group);
                                             the paper keeps the scale and updates only the zero:
                                             `optimize_scale=False` does exactly that
    int sym    W ~ (q - 2^(b-1)) * scale    scale (no zero point exists on this grid)
    nf4        W ~ NF4[q] * scale           scale
The error W - W_r is measured in units of the group's RTN step (|scale|), so `beta` means the
same for every layer: with beta = 10 and p = 0.7 errors below ~0.17 step are shrunk to zero
(treated as noise) and larger ones are kept (treated as outliers the grid need not chase).
Parameters are kept in fp16 precision (as stored) and codes are re-chosen by nearest rounding
against the stored values. Per group, the iterate with the lowest weight MSE is kept
(iteration 0 is RTN, so HQQ never has a larger per-group weight MSE than RTN); `early_stop`
ends the loop when the mean p-norm error stops decreasing (as the reference does).

fp8 is rejected: its floating-point grid has the same relative precision at every magnitude,
so a per-channel scale change moves almost nothing (there is no zero point); use `rtn`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..formats.grid import (NF4_CODEBOOK, QuantizedWeight, _fp16, decode_groups, group_view, params_from_range,
                            quantize_groups)
from ..formats.scheme import Scheme
from .registry import Method, register_method
from .threads import single_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HQQParams:
    iterations: int = 20  # half-quadratic rounds
    lp_norm: float = 0.7  # p of the sparsity-promoting error norm, 0 < p < 1
    beta: float = 10.0  # initial quadratic penalty (errors in units of the group's step)
    kappa: float = 1.01  # beta grows by this factor every round
    early_stop: bool = True  # stop once the mean lp error stops decreasing
    optimize_scale: bool = True  # -asym: fit scale and offset; False = offset (zero) only, as the paper

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 0.0 < self.lp_norm < 1.0:
            raise ValueError(f"lp_norm must be in (0, 1), got {self.lp_norm}")
        if self.beta <= 0 or self.kappa < 1.0:
            raise ValueError(f"need beta > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of |x|^p with penalty beta."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1.0) / beta)


def _levels(scheme: Scheme, codes: torch.Tensor) -> torch.Tensor:
    """Grid value of each code before scaling (scale-only grids)."""
    if scheme.kind == "nf4":
        return NF4_CODEBOOK[codes.long()]
    return codes.float() - (1 << (scheme.bits - 1))


def _fit(scheme: Scheme, codes: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
         offset: torch.Tensor | None, fit_scale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares parameters of the codes (G0, G1, L) to target, per group; degenerate groups keep theirs."""
    if offset is None:  # scale only: s = <c, t> / <c, c>
        c = _levels(scheme, codes)
        den = (c * c).sum(-1)
        s = (c * target).sum(-1) / den.clamp_min(1e-12)
        ok = (den > 0) & (s.abs() > 0) & torch.isfinite(s)
        return _fp16(torch.where(ok, s, scale)), None
    q = codes.float()
    if not fit_scale:  # the paper's zero update: offset = mean(t - q * scale)
        return scale, _fp16((target - q * scale.unsqueeze(-1)).mean(-1))
    q_mean, t_mean = q.mean(-1), target.mean(-1)
    qc = q - q_mean.unsqueeze(-1)
    var = (qc * qc).sum(-1)
    s = (qc * (target - t_mean.unsqueeze(-1))).sum(-1) / var.clamp_min(1e-12)
    ok = (var > 0) & (s > 0) & torch.isfinite(s)
    s = _fp16(torch.where(ok, s, scale))
    return s, _fp16(t_mean - s * q_mean)


def _solve_groups(scheme: Scheme, groups: torch.Tensor, params: HQQParams):
    """HQQ on groups (G0, G1, L) -> (codes, scale, offset), starting from RTN."""
    scale, offset = params_from_range(scheme, groups.amin(-1), groups.amax(-1))  # RTN start, (G0, G1)
    step = scale.abs().unsqueeze(-1)  # error unit, fixed at the RTN step
    codes = quantize_groups(scheme, groups, scale, offset)
    best_codes, best_scale, best_offset = codes, scale, offset
    best_mse = (decode_groups(scheme, codes, scale, offset) - groups).pow(2).mean(-1)
    beta, prev_err = params.beta, float("inf")
    w_r = decode_groups(scheme, codes, scale, offset)
    for _ in range(params.iterations):
        w_e = shrink_lp((groups - w_r) / step, beta, params.lp_norm).mul_(step)
        scale, offset = _fit(scheme, codes, groups - w_e, scale, offset, params.optimize_scale)
        codes = quantize_groups(scheme, groups, scale, offset)
        w_r = decode_groups(scheme, codes, scale, offset)
        err = w_r - groups
        mse = err.pow(2).mean(-1)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = None if offset is None else torch.where(better, offset, best_offset)
        beta *= params.kappa
        if params.early_stop:
            lp_err = err.div_(step).abs_().pow_(params.lp_norm).mean().item()
            if lp_err >= prev_err:
                break
            prev_err = lp_err
    return best_codes, best_scale, best_offset


_warned_symmetric: set[str] = set()


def warn_if_symmetric(scheme: Scheme) -> None:
    """Once per scheme and process: on a symmetric integer grid HQQ has no zero point to move and
    fits only the scale (weight-MSE clipping), which measured worse than plain rounding on the
    default model at 4 bits (docs/results/methods.md)."""
    if scheme.kind != "int" or not scheme.symmetric or scheme.name in _warned_symmetric:
        return
    _warned_symmetric.add(scheme.name)
    log.warning("hqq on the symmetric grid %s fits only the scale (there is no zero point); on SmolLM2 that was "
                "worse than rtn at w4 (ppl 83.2 vs 52.4) and w4g64 (37.3 vs 36.4), better at w3g64 (95.6 vs 102.2). "
                "HQQ is made for grids with a zero point: consider %s-asym", scheme.name, scheme.name)


@torch.no_grad()
def hqq_quantize_weight(w: torch.Tensor, scheme: Scheme, params: HQQParams) -> QuantizedWeight:
    warn_if_symmetric(scheme)
    w = w.detach().float()
    groups = group_view(w, scheme)  # (G0, G1, L)
    # Rows are independent: solve blocks of ~64k weights so the temporaries stay in cache, on one
    # thread (elementwise passes; measured on the busy 2-core machine, 576x1536 w4g64-asym:
    # ~1.0 s on 1 thread in 64k blocks, 1.3 s whole-matrix, 4-12 s on 2 threads). early_stop acts per block.
    rows = max(1, ROWS_PER_BLOCK_ELEMS // max(1, groups.shape[1] * groups.shape[2]))
    with single_thread():
        parts = [_solve_groups(scheme, groups[i: i + rows], params) for i in range(0, groups.shape[0], rows)]
    codes = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    offset = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return QuantizedWeight(scheme, codes.reshape(w.shape), scale, offset)


ROWS_PER_BLOCK_ELEMS = 1 << 16


def supports(scheme: Scheme) -> bool:
    return scheme.act_bits is None and scheme.kind in ("int", "nf4")


register_method(Method(
    name="hqq",
    params_cls=HQQParams,
    needs_calibration=False,
    quantize_weight=hqq_quantize_weight,
    supports=supports,
    description="HQQ half-quadratic optimisation of scale/offset (calibration-free); int (sym/asym) and nf4",
    schemes="weight-only integer schemes (w{bits}[g{group}|pt][-asym]) and nf4g{group}; not fp8 or w8a8",
))
