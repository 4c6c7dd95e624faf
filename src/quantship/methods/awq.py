"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Input channels that see large activations matter most. For every group of linears fed by one
foldable predecessor (architecture table), search s = mean|x|^a (a on a grid in [0, 1), a = 0
being plain rounding), normalised to geometric mean 1, minimising the group's output error
|| x W^T - (x / s) Q(W s)^T ||^2 on a sample of calibration inputs; fold s into the predecessor
(its output divided by s, exact in float) and the linears' input columns (multiplied by s).
The scaled weights are then rounded by a weight quantizer chosen by name (`quantizer`, with its
own params as `QUANTIZER.key`): `rtn` (default) after a per-group clipping search that shrinks
each group's range to minimise that group's output error (`clip`), or `gptq` (`--method awq
--param quantizer=gptq`, shorthand `awq+gptq`) with the Hessian of the folded inputs: the float
H rescaled, H' = H / (s s^T), or with gptq.true_sequential collected from the folded block with
the earlier groups already quantized; GPTQ then runs its own Hessian-weighted range search
(gptq.clip_search) instead of AWQ's clip. Each linear is rounded on its own scheme (per-layer
overrides); the scale search fake-quantizes each linear of a group on its scheme.

Ours compares the linears' outputs, not the whole attention/MLP output the reference uses.
Under grouped-query attention o_proj's inputs are v_proj's outputs repeated per head group: s is
searched in v_proj's channel space (the activation means of the repeated columns averaged) and
expanded per head group for o_proj, so the fold stays exact. Groups with no foldable predecessor
(GPT-2's c_proj) get the clipping search only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.grid import QuantizedWeight, group_view, quantize_weight
from ..formats.scheme import Scheme
from .gptq import quantize_group_gptq
from .registry import Method, TransformParams, register_method
from .rtn import best_clip_ratio, rtn_quantize_weight

_GPTQ_OWN = "it is GPTQ's own parameter now: --param quantizer=gptq --param gptq.{name}=VALUE (or --method awq+gptq)"


@dataclass(frozen=True)
class AWQParams(TransformParams):
    RETIRED: ClassVar[dict[str, str]] = {
        name: _GPTQ_OWN.format(name=name)
        for name in ("percdamp", "block_size", "act_order", "max_damp_retries", "true_sequential")}

    quantizer: str = "rtn"  # the weight quantizer of the scaled weights: rtn or gptq (its params as gptq.KEY)
    grid: int = 20  # exponents a = 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True  # quantizer rtn: per-group output-error clipping search after scaling
    clip_grid: int = 20  # clip ratios from 1.0 down to clip_min
    clip_min: float = 0.5
    sample_tokens: int = 1024  # calibration rows per input group used by the scale search
    clip_tokens: int = 512  # of those, rows used by the clipping search
    batch_size: int = 4  # calibration windows per block forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1 or self.clip_grid < 2 or not 0.0 < self.clip_min < 1.0:
            raise ValueError("need grid >= 1, clip_grid >= 2 and 0 < clip_min < 1")
        if self.sample_tokens < 1 or self.clip_tokens < 1 or self.batch_size < 1:
            raise ValueError("sample_tokens, clip_tokens and batch_size must be >= 1")
        if self.quantizer == "rtn" and self.clip and self.quantizer_params.clip_search:
            raise ValueError("awq: clip (the output-error clipping search) and rtn.clip_search (the weight-MSE one) "
                             "both choose the range; keep one (--param clip=false to use rtn's)")


def _fake_quant(scheme: Scheme, w: torch.Tensor, clip=1.0) -> torch.Tensor:
    return quantize_weight(scheme, w, clip).dequantize()


def _fake_quant_rows(schemes: Scheme | list[Scheme], rows: list[int] | None, w: torch.Tensor) -> torch.Tensor:
    """Q(W) of row-stacked linears, each block of rows on its own scheme (one scheme: as one matrix)."""
    if isinstance(schemes, Scheme) or len(set(schemes)) == 1:
        return _fake_quant(schemes if isinstance(schemes, Scheme) else schemes[0], w)
    return torch.cat([_fake_quant(sc, part) for sc, part in zip(schemes, w.split(rows))])


@torch.no_grad()
def search_scale(w: torch.Tensor, x: torch.Tensor, x_abs_mean: torch.Tensor, scheme: Scheme | list[Scheme],
                 grid: int, expand=lambda s: s, rows: list[int] | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """Best scale s for weight w (out, in) on inputs x (T, in). -> (s, a, losses).

    s lives in the predecessor's channel space (that of x_abs_mean); expand maps it onto w's input
    columns (identity, or the per-head-group repeat of GQA's v_proj -> o_proj). w may stack several
    linears' rows (`rows` per linear), each fake-quantized on its own entry of a list `scheme`."""
    ref = x @ w.t()
    best, best_s, best_a, losses = float("inf"), torch.ones_like(x_abs_mean), 0.0, []
    for k in range(grid):
        a = k / grid
        s = x_abs_mean.clamp_min(1e-4).pow(a)
        s = s / (s.max() * s.min()).sqrt()
        s_in = expand(s)
        out = (x / s_in) @ _fake_quant_rows(scheme, rows, w * s_in).t()
        loss = (out - ref).pow(2).mean().item()
        losses.append(loss)
        if loss < best:
            best, best_s, best_a = loss, s, a
    return best_s, best_a, losses


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, params: AWQParams) -> torch.Tensor:
    """Per (row, group) clip ratio minimising that group's contribution to the output error."""
    wg = group_view(w, scheme)  # (G0, G1, L)
    if scheme.granularity == "tensor":
        return torch.ones(1, 1)
    xg = x.reshape(x.shape[0], wg.shape[1], wg.shape[2])  # (T, G1, L)
    # per (row, group): sum over tokens of (sum over the group's inputs of (W - Q) x)^2
    return best_clip_ratio(scheme, w, params.clip_grid, params.clip_min,
                           lambda d: torch.einsum("ogl,tgl->ogt", group_view(d, scheme), xg).pow(2).sum(-1))


def _layout(block, group) -> tuple[int, int] | None:
    """(n_rep, head_dim) mapping group.prev's channels onto its linears' inputs; None if not foldable."""
    from .fold import group_layout

    try:
        return group_layout(block, group)
    except ValueError:
        return None


def awq_block_solver(params: AWQParams, report: dict):
    from ..pipeline import linear_weight
    from .fold import expand_to_consumer, fold_input_scale, reduce_to_prev

    use_gptq = params.quantizer == "gptq"

    def solve(ctx) -> dict[str, QuantizedWeight]:
        # Phase 1: search and fold every group's scale. Folding a linear predecessor (v_proj,
        # up_proj) rescales rows of a linear from an earlier group, so nothing is rounded until
        # all scales are in place.
        scales: dict[tuple[str, ...], torch.Tensor] = {}
        for group in ctx.groups:
            scale_group = ctx.group_prev.get(group)
            layout = None if scale_group is None or tuple(scale_group.linears) != group \
                else _layout(ctx.block, scale_group)
            if layout is None:
                report.setdefault("awq_unscaled", []).append(f"{ctx.prefix}.{','.join(group)}")
                continue
            stats = ctx.stats[group]
            weights = [linear_weight(ctx.block.get_submodule(n)).float() for n in group]
            s, a, _ = search_scale(torch.cat(weights), stats.sample(), reduce_to_prev(stats.abs_mean(), *layout, how="mean"),
                                   [ctx.schemes[n] for n in group], params.grid,
                                   expand=lambda v: expand_to_consumer(v, *layout), rows=[w.shape[0] for w in weights])
            fold_input_scale(ctx.block, scale_group, ctx.facts, s)
            scales[group] = expand_to_consumer(s, *layout)  # in the linears' input space
            report.setdefault("awq_exponent", {})[f"{ctx.prefix}:{group[0]}"] = a
        # Phase 2: round the final weights against their (rescaled) inputs.
        sequential = use_gptq and params.quantizer_params.true_sequential
        chosen: dict[str, QuantizedWeight] = {}
        for group in ctx.groups_in_forward_order() if sequential else ctx.groups:
            weights = [linear_weight(ctx.block.get_submodule(n)).float() for n in group]
            names = [f"{ctx.prefix}.{n}" for n in group]
            schemes = [ctx.schemes[n] for n in group]
            if use_gptq:
                h = folded_hessian(ctx, group, scales.get(group), sequential)
                qws = quantize_group_gptq(weights, h, schemes, params.quantizer_params, names, report)
            else:
                s = scales.get(group)
                x = ctx.stats[group].sample() if s is None else ctx.stats[group].sample() / s
                x = x[:: max(1, x.shape[0] // params.clip_tokens)][: params.clip_tokens]
                qws = [_round_nearest(w, x, scheme, params) for w, scheme in zip(weights, schemes)]
            solved = dict(zip(group, qws))
            if sequential:
                ctx.load(solved)  # the next group's Hessian sees these quantized values
            chosen.update(solved)
        return chosen

    return solve


def _round_nearest(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, params: AWQParams) -> QuantizedWeight:
    """Quantizer rtn: AWQ's output-error clip (clip), else rtn with its own params."""
    if params.clip:
        return quantize_weight(scheme, w, search_clip(w, x, scheme, params))
    return rtn_quantize_weight(w, scheme, params.quantizer_params)


def folded_hessian(ctx, group: tuple[str, ...], s: torch.Tensor | None, sequential: bool) -> torch.Tensor:
    """H of the group's inputs after the fold (x / s): collected from the folded block as it is
    now (true-sequential: exact, earlier groups quantized) or the float H rescaled, H / (s s^T)."""
    if sequential:
        return ctx.collect_group_stats(group).mean_hessian()
    h = ctx.stats[group].mean_hessian()
    return h if s is None else h / torch.outer(s, s)


def run_awq(model, targets, schemes: dict[str, Scheme], params: AWQParams, calib, *, progress: bool = True,
            report: dict | None = None, on_quantized=None):
    from ..pipeline import schemes_label
    from .layerwise import run_layerwise_with_leftovers

    report = report if report is not None else {}
    hessian = params.quantizer == "gptq" and not params.quantizer_params.true_sequential  # sequential: per group
    return run_layerwise_with_leftovers(
        model, targets, calib, awq_block_solver(params, report), schemes=schemes,
        batch_size=params.batch_size, sample_tokens=params.sample_tokens, want_hessian=hessian,
        progress=progress, report=report, desc=f"awq+{params.quantizer} {schemes_label(schemes)}",
        on_quantized=on_quantized)


register_method(Method(
    name="awq", params_cls=AWQParams, needs_calibration=True, run=run_awq, streams=True,
    supports=lambda scheme: scheme.act_bits is None,
    description="AWQ activation-aware scaling, then a weight quantizer: rtn (default, with AWQ's clipping search) "
                "or gptq (--param quantizer=gptq; shorthand awq+gptq)",
    schemes="weight-only schemes (with quantizer gptq: integer and nf4g*)",
))
