"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Input channels that see large activations matter most. For every group of linears fed by one
foldable predecessor (architecture table), search s = mean|x|^a (a on a grid in [0, 1), a = 0
being plain rounding), normalised to geometric mean 1, minimising the group's output error
|| x W^T - (x / s) Q(W s)^T ||^2 on a sample of calibration inputs; fold s into the predecessor
(its output divided by s, exact in float) and the linears' input columns (multiplied by s).
Then a per-group clipping search shrinks each group's range to minimise that group's output
error. The weights are finally rounded (`awq`, `awq+rtn`) or handed to GPTQ (`awq+gptq`) with
the Hessian of the folded inputs: the float H rescaled, H' = H / (s s^T), or with
true_sequential collected from the folded block with the earlier groups already quantized.

Ours compares the linears' outputs, not the whole attention/MLP output the reference uses.
Under grouped-query attention o_proj's inputs are v_proj's outputs repeated per head group: s is
searched in v_proj's channel space (the activation means of the repeated columns averaged) and
expanded per head group for o_proj, so the fold stays exact. Groups with no foldable predecessor
(GPT-2's c_proj) get the clipping search only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.grid import QuantizedWeight, group_view, quantize_weight
from ..formats.scheme import Scheme
from .gptq import GPTQParams, quantize_group_gptq
from .registry import Method, register_method
from .rtn import best_clip_ratio


@dataclass(frozen=True)
class AWQParams:
    grid: int = 20  # exponents a = 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True  # per-group clipping search after scaling
    clip_grid: int = 20  # clip ratios from 1.0 down to clip_min
    clip_min: float = 0.5
    sample_tokens: int = 1024  # calibration rows per input group used by the scale search
    clip_tokens: int = 512  # of those, rows used by the clipping search
    batch_size: int = 4  # calibration windows per block forward

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 2 or not 0.0 < self.clip_min < 1.0:
            raise ValueError("need grid >= 1, clip_grid >= 2 and 0 < clip_min < 1")
        if self.sample_tokens < 1 or self.clip_tokens < 1 or self.batch_size < 1:
            raise ValueError("sample_tokens, clip_tokens and batch_size must be >= 1")


@dataclass(frozen=True)
class AWQGPTQParams(AWQParams):
    clip: bool = True  # GPTQ's own range search, Hessian-weighted (GPTQParams.clip_search)
    percdamp: float = 0.01  # as GPTQParams
    block_size: int = 128
    act_order: bool = True
    max_damp_retries: int = 6
    true_sequential: bool = True  # GPTQ's: each group's H from the block with earlier groups quantized

    def gptq(self) -> GPTQParams:
        return GPTQParams(percdamp=self.percdamp, block_size=self.block_size, act_order=self.act_order,
                          max_damp_retries=self.max_damp_retries, batch_size=self.batch_size,
                          clip_search=self.clip, clip_grid=self.clip_grid, clip_min=self.clip_min,
                          true_sequential=self.true_sequential)


def _fake_quant(scheme: Scheme, w: torch.Tensor, clip=1.0) -> torch.Tensor:
    return quantize_weight(scheme, w, clip).dequantize()


@torch.no_grad()
def search_scale(w: torch.Tensor, x: torch.Tensor, x_abs_mean: torch.Tensor, scheme: Scheme,
                 grid: int, expand=lambda s: s) -> tuple[torch.Tensor, float, list[float]]:
    """Best scale s for weight w (out, in) on inputs x (T, in). -> (s, a, losses).

    s lives in the predecessor's channel space (that of x_abs_mean); expand maps it onto w's input
    columns (identity, or the per-head-group repeat of GQA's v_proj -> o_proj)."""
    ref = x @ w.t()
    best, best_s, best_a, losses = float("inf"), torch.ones_like(x_abs_mean), 0.0, []
    for k in range(grid):
        a = k / grid
        s = x_abs_mean.clamp_min(1e-4).pow(a)
        s = s / (s.max() * s.min()).sqrt()
        s_in = expand(s)
        out = (x / s_in) @ _fake_quant(scheme, w * s_in).t()
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


def awq_block_solver(scheme: Scheme, params: AWQParams, report: dict, use_gptq: bool):
    from ..pipeline import linear_weight
    from .fold import expand_to_consumer, fold_input_scale, reduce_to_prev

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
                                   scheme, params.grid, expand=lambda v: expand_to_consumer(v, *layout))
            fold_input_scale(ctx.block, scale_group, ctx.facts, s)
            scales[group] = expand_to_consumer(s, *layout)  # in the linears' input space
            report.setdefault("awq_exponent", {})[f"{ctx.prefix}:{group[0]}"] = a
        # Phase 2: round the final weights against their (rescaled) inputs.
        sequential = use_gptq and params.true_sequential
        chosen: dict[str, QuantizedWeight] = {}
        for group in ctx.groups_in_forward_order() if sequential else ctx.groups:
            weights = [linear_weight(ctx.block.get_submodule(n)).float() for n in group]
            names = [f"{ctx.prefix}.{n}" for n in group]
            if use_gptq:
                h = folded_hessian(ctx, group, scales.get(group), sequential)
                qws = quantize_group_gptq(weights, h, scheme, params.gptq(), names, report)
            else:
                s = scales.get(group)
                x = ctx.stats[group].sample() if s is None else ctx.stats[group].sample() / s
                x = x[:: max(1, x.shape[0] // params.clip_tokens)][: params.clip_tokens]
                qws = [quantize_weight(scheme, w, search_clip(w, x, scheme, params) if params.clip else 1.0)
                       for w in weights]
            solved = dict(zip(group, qws))
            if sequential:
                ctx.load(solved)  # the next group's Hessian sees these quantized values
            chosen.update(solved)
        return chosen

    return solve


def folded_hessian(ctx, group: tuple[str, ...], s: torch.Tensor | None, sequential: bool) -> torch.Tensor:
    """H of the group's inputs after the fold (x / s): collected from the folded block as it is
    now (true-sequential: exact, earlier groups quantized) or the float H rescaled, H / (s s^T)."""
    if sequential:
        return ctx.collect_group_stats(group).mean_hessian()
    h = ctx.stats[group].mean_hessian()
    return h if s is None else h / torch.outer(s, s)


def _runner(use_gptq: bool):
    def run(model, targets, scheme: Scheme, params: AWQParams, calib, *, progress: bool = True,
            report: dict | None = None, on_quantized=None):
        from .layerwise import run_layerwise_with_leftovers

        report = report if report is not None else {}
        name = "awq+gptq" if use_gptq else "awq"
        return run_layerwise_with_leftovers(
            model, targets, calib, awq_block_solver(scheme, params, report, use_gptq), scheme=scheme,
            batch_size=params.batch_size, sample_tokens=params.sample_tokens,
            want_hessian=use_gptq and not params.true_sequential,  # sequential: collected per group
            progress=progress, report=report, desc=f"{name} {scheme.name}", on_quantized=on_quantized)
    return run


def _supports_rtn(scheme: Scheme) -> bool:
    return scheme.act_bits is None


def _supports_gptq(scheme: Scheme) -> bool:
    return scheme.act_bits is None and scheme.kind in ("int", "nf4")


for _name, _params, _gptq, _doc in (
    ("awq", AWQParams, False, "AWQ activation-aware scaling + clipping, then round to nearest (= awq+rtn)"),
    ("awq+rtn", AWQParams, False, "AWQ activation-aware scaling + clipping, then round to nearest"),
    ("awq+gptq", AWQGPTQParams, True, "AWQ activation-aware scaling, then GPTQ on the scaled weights"),
):
    register_method(Method(name=_name, params_cls=_params, needs_calibration=True, run=_runner(_gptq), streams=True,
                           supports=_supports_gptq if _gptq else _supports_rtn, description=_doc))
