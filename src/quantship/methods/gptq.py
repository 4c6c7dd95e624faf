"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's inputs, H = E[x x^T]. Minimises ||W X - Q X||^2 per layer rather than ||W - Q||^2.

Implementation notes (ours, from the paper):
  * Cholesky of H^-1 (upper) gives the per-column update rows; dampening adds percdamp x
    mean(diag H) to the diagonal. A Hessian that is still not positive definite gets 10x more
    dampening, up to max_damp_retries times (logged, recorded); a layer that never factors falls
    back to RTN (recorded) -- never a crash or NaN.
  * Lazy blocked updates: errors inside a block of `block_size` columns update that block
    immediately; the rest of the matrix is updated once per block with one matmul.
  * clip_search: before the column loop, each static group's range is shrunk by the ratio r in
    [clip_min, 1] minimising d H_gg d^T, d = W - Q(W; r): the rounding error as the layer's
    output sees it. Min/max ranges spend levels on a few outlier weights; GPTQ's error feedback
    cannot win those levels back.
  * act_order: columns in order of decreasing diag(H). Groups stay "static" -- each group's
    scale/offset comes from the original columns of that group -- so the stored layout is the
    plain group layout and needs no permutation at inference.
  * Linears that share an input (q/k/v, gate/up) and have the same scheme are quantized as one
    row-stacked matrix: GPTQ treats rows independently, so this is exact and saves the column
    loop. Linears of the group with another scheme (a per-layer override) are solved on their own,
    against the same Hessian.
  * true_sequential (the reference's --true-sequential): inside a block the input groups are
    quantized in forward order, and each group's Hessian is collected from inputs that the
    block's already-quantized earlier groups produced (one forward per batch, stopped at the
    group's input), so o_proj's H sees the q/k/v rounding and down_proj's sees everything before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..formats.grid import QuantizedWeight, decode_groups, group_view, params_from_range, quantize_groups
from ..formats.scheme import Scheme
from .registry import Method, register_method
from .threads import single_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQParams:
    # the paper's 0.01: with the range search and true-sequential Hessians below, light dampening
    # keeps more of the Hessian's information and closes more of RTN's gap than 0.1
    # (docs/results/methods.md, "GPTQ's defaults")
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = True  # columns by decreasing Hessian diagonal (static groups: plain layout)
    max_damp_retries: int = 6  # each retry multiplies the dampening by 10
    # each group's range shrink chosen to minimise the Hessian-weighted rounding error: a min/max
    # range wastes levels on outliers that the error feedback cannot win back (docs/methods.md)
    clip_search: bool = True
    clip_grid: int = 20  # candidate ratios between 1.0 and clip_min
    clip_min: float = 0.5
    # calibration windows per block forward: few keeps the forward's transient memory small, which
    # the layer-by-layer pass needs to stay under 2x the float model
    batch_size: int = 2
    # inside a block, quantize the input groups in forward order (q/k/v, o, gate/up, down) and take
    # each later group's Hessian from inputs produced by the already-quantized earlier linears, so
    # later groups correct the earlier ones' rounding. It is also the fast path: run branch by
    # branch, every linear once per block (methods/block_runner.py). Off: every group's H from one
    # float pass of the block, then a quantized re-run.
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.percdamp < 10.0:
            raise ValueError(f"percdamp must be in [0, 10), got {self.percdamp}")
        if self.block_size < 1 or self.max_damp_retries < 0 or self.batch_size < 1:
            raise ValueError("block_size and batch_size must be >= 1, max_damp_retries >= 0")
        if self.clip_grid < 2 or not 0.0 < self.clip_min < 1.0:
            raise ValueError("clip_grid must be >= 2 and clip_min in (0, 1)")


class CholeskyFailed(RuntimeError):
    pass


def inverse_hessian_factor(h: torch.Tensor, percdamp: float, max_retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor U of (H + damp I)^-1 (float32), the dampening used and the retries taken."""
    h = h.double()
    if not torch.isfinite(h).all():
        raise CholeskyFailed("the Hessian has NaN or infinite entries")
    n = h.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    base = h.diagonal().abs().mean().item() or 1e-8
    damp = percdamp * base if percdamp > 0 else 0.0
    for attempt in range(max_retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info2.item() == 0 and torch.isfinite(upper).all():
                return upper.float(), damp, attempt
        damp = max(damp * 10.0, 1e-6 * base) if damp else 0.01 * base
        if attempt < max_retries:
            log.warning("GPTQ: Hessian not positive definite; retrying with dampening %.3g", damp)
    raise CholeskyFailed(f"Hessian not positive definite after {max_retries} dampening retries")


def _column_quantizer(scheme: Scheme):
    """(column (out,), scale, offset) -> (codes as float, dequantized column): the same grid as
    formats.grid.quantize_groups/decode_groups, specialised for one column (the hot loop)."""
    if scheme.kind != "int":
        def generic(column, scale, offset):
            s = scale.reshape(-1, 1)
            o = offset.reshape(-1, 1) if offset is not None else None
            q = quantize_groups(scheme, column.reshape(-1, 1, 1), s, o)
            return q.reshape(-1).float(), decode_groups(scheme, q, s, o).reshape(-1)
        return generic
    levels = float((1 << scheme.bits) - 1)
    if scheme.symmetric:
        half = float(1 << (scheme.bits - 1))

        def symmetric(column, scale, offset):
            q = torch.round(column / scale).add_(half).clamp_(0.0, levels)
            return q, (q - half) * scale
        return symmetric

    def asymmetric(column, scale, offset):
        q = torch.round((column - offset) / scale).clamp_(0.0, levels)
        return q, q * scale + offset
    return asymmetric


def hessian_clip_search(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, grid: int, clip_min: float) -> torch.Tensor:
    """Per-group range shrink r in [clip_min, 1] minimising the rounding error as the layer's
    output sees it, d_g H_gg d_g^T with d = W - Q(W; r) and H_gg the group's diagonal block of
    the input Hessian (plain weight MSE would treat a dead input like an outlier's). -> (G0, G1)."""
    from .rtn import best_clip_ratio

    out_f, in_f = w.shape
    if scheme.granularity == "group":
        gs = scheme.group_size
        blocks = h.reshape(in_f // gs, gs, in_f // gs, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

        def error(d):
            d = d.reshape(out_f, in_f // gs, gs)
            return torch.einsum("ogi,gij,ogj->og", d, blocks, d)
    else:
        def error(d):
            e = ((d @ h) * d).sum(1, keepdim=True)  # (out, 1)
            return e if scheme.granularity == "channel" else e.sum().reshape(1, 1)
    return best_clip_ratio(scheme, w, grid, clip_min, error)


def _group_params(scheme: Scheme, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scale/offset (out,) from a slice of columns (out, k) on the scheme's grid."""
    w_min, w_max = cols.amin(dim=1), cols.amax(dim=1)
    return params_from_range(scheme, w_min, w_max)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, params: GPTQParams) -> tuple[QuantizedWeight, dict]:
    """GPTQ one (out, in) weight against its input Hessian (in, in). -> (weight, info)."""
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that never fire: any value works; zero keeps them harmless
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # static scale/offset come from the weights before any update; lazy groups (no act-order)
    # are set later from the columns as GPTQ has updated them, so they get no range search
    static = scheme.granularity != "group" or params.act_order
    clip = hessian_clip_search(w, h, scheme, params.clip_grid, params.clip_min) if params.clip_search and static else 1.0
    with single_thread():
        return _gptq_quantize(w, h, scheme, params, clip, static)


def _gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, params: GPTQParams, clip, static: bool
                   ) -> tuple[QuantizedWeight, dict]:
    out_f, in_f = w.shape
    group_len = in_f if scheme.granularity != "group" else scheme.group_size
    if static:
        groups = group_view(w, scheme)
        s, o = params_from_range(scheme, groups.amin(-1) * clip, groups.amax(-1) * clip)
        scale_all, offset_all = s.clone(), (o.clone() if o is not None else None)
    else:
        n_groups = in_f // group_len
        scale_all = torch.zeros(out_f, n_groups)
        offset_all = torch.zeros(out_f, n_groups) if not scheme.symmetric and scheme.kind == "int" else None

    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if params.act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    upper, damp, retries = inverse_hessian_factor(h, params.percdamp, params.max_damp_retries)

    quantize_column = _column_quantizer(scheme)
    codes = torch.zeros(in_f, out_f)  # transposed: column j of W is a contiguous row here
    B = params.block_size
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        w1 = w[:, i1:i2].t().contiguous()  # (cols, out)
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            orig = perm[col].item() if perm is not None else col
            g = orig // group_len if scheme.granularity == "group" else 0
            if not static and orig % group_len == 0:
                # the group's columns as they are now (earlier errors already pushed onto them)
                cols = w1[j: j + group_len].t() if j + group_len <= i2 - i1 else \
                    torch.cat((w1[j:].t(), w[:, i2:]), dim=1)[:, :group_len]
                s, o = _group_params(scheme, cols)
                scale_all[:, g] = s
                if offset_all is not None:
                    offset_all[:, g] = o
            scale = scale_all[:, g] if scheme.granularity != "tensor" else scale_all[0, 0]
            offset = None if offset_all is None else (offset_all[:, g] if scheme.granularity != "tensor" else offset_all[0, 0])
            q, dq = quantize_column(w1[j], scale, offset)
            codes[col] = q
            err = (w1[j] - dq) / u1[j, j]
            w1[j:] -= u1[j, j:].unsqueeze(1) * err.unsqueeze(0)
            err1[j] = err
        w[:, i2:] -= err1.t() @ upper[i1:i2, i2:]
    codes = codes.t().to(torch.uint8)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(scheme, codes, scale_all.contiguous(), offset_all.contiguous() if offset_all is not None else None)
    return qw, {"damp": damp, "retries": retries}


def layer_output_error(w: torch.Tensor, qw: QuantizedWeight, hessian: torch.Tensor) -> float:
    """E||(W - Q) x||^2 summed over outputs = trace((W-Q) H (W-Q)^T) with H = E[x x^T]."""
    d = w.float() - qw.dequantize()
    return float(((d @ hessian.float()) * d).sum())


def quantize_group_gptq(weights: list[torch.Tensor], hessian: torch.Tensor, schemes: Scheme | list[Scheme],
                        params: GPTQParams, names: list[str], report: dict) -> list[QuantizedWeight]:
    """GPTQ for linears sharing one input, each on its scheme (one for all, or one per weight):
    those of one scheme are row-stacked and solved together; RTN fallback when the Hessian never factors."""
    schemes = list(schemes) if isinstance(schemes, (list, tuple)) else [schemes] * len(weights)
    results: list[QuantizedWeight | None] = [None] * len(weights)
    for scheme in dict.fromkeys(schemes):  # distinct schemes, first-seen order
        idx = [i for i, s in enumerate(schemes) if s == scheme]
        solved = _solve_same_scheme([weights[i] for i in idx], hessian, scheme, params, [names[i] for i in idx], report)
        for i, qw in zip(idx, solved):
            results[i] = qw
    return results


def _solve_same_scheme(weights: list[torch.Tensor], hessian: torch.Tensor, scheme: Scheme, params: GPTQParams,
                       names: list[str], report: dict) -> list[QuantizedWeight]:
    from ..formats.grid import quantize_weight
    from .layerwise import split_rows

    stack = scheme.granularity != "tensor"  # a per-tensor scale must stay per linear
    parts = [torch.cat(weights, 0)] if stack else weights
    results = []
    for w in parts:
        try:
            qw, info = gptq_quantize(w, hessian, scheme, params)
            if info["retries"]:
                report.setdefault("gptq_damp_retries", {})[",".join(names)] = info
        except CholeskyFailed as e:
            log.warning("GPTQ: %s: %s; falling back to RTN for these layers", ",".join(names), e)
            report.setdefault("gptq_rtn_fallback", []).extend(names)
            qw = quantize_weight(scheme, w)
        results.append(qw)
    return split_rows(results[0], [w.shape[0] for w in weights]) if stack else results


def gptq_block_solver(params: GPTQParams, report: dict):
    from ..pipeline import linear_weight

    def solve(ctx) -> dict[str, QuantizedWeight]:
        chosen = {}
        for group in ctx.groups_in_forward_order() if params.true_sequential else ctx.groups:
            weights = [linear_weight(ctx.block.get_submodule(n)) for n in group]
            hessian = group_hessian(ctx, group, params.true_sequential)
            names = [f"{ctx.prefix}.{n}" for n in group]
            schemes = [ctx.schemes[n] for n in group]
            solved = dict(zip(group, quantize_group_gptq(weights, hessian, schemes, params, names, report)))
            if params.true_sequential:
                ctx.load(solved)  # the next group's inputs come from these quantized values
            chosen.update(solved)
        return chosen

    return solve


def group_hessian(ctx, group: tuple[str, ...], true_sequential: bool) -> torch.Tensor:
    """H of the group's input: from the block as it is now (true-sequential: earlier groups
    already quantized) or from the float statistics pass."""
    stats = ctx.collect_group_stats(group) if true_sequential else ctx.stats[group]
    return stats.mean_hessian()


def run_gptq(model, targets, schemes: dict[str, Scheme], params: GPTQParams, calib, *, progress: bool = True,
             report: dict | None = None, on_quantized=None):
    from ..pipeline import schemes_label
    from .layerwise import run_layerwise_with_leftovers

    report = report if report is not None else {}
    return run_layerwise_with_leftovers(model, targets, calib, gptq_block_solver(params, report),
                                        schemes=schemes, batch_size=params.batch_size, want_hessian=True,
                                        float_stats=not params.true_sequential, progress=progress,
                                        report=report, desc=f"gptq {schemes_label(schemes)}",
                                        on_quantized=on_quantized)


def supports(scheme: Scheme) -> bool:
    return scheme.kind in ("int", "nf4")


register_method(Method(
    name="gptq",
    params_cls=GPTQParams,
    needs_calibration=True,
    run=run_gptq,
    streams=True,
    supports=supports,
    description="GPTQ: Hessian-aware column-by-column rounding with error feedback (integer, nf4 schemes)",
))
