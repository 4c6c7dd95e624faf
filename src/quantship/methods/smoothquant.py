"""SmoothQuant (Xiao et al., 2023) for w8a8: migrate activation outliers into the weights.

Activations of LLMs have a few input channels with huge magnitudes, so one int8 scale per
token wastes most levels on them; weights are flat. For every group of linears fed by a
foldable predecessor (architecture table), with the per-input-channel absolute maxima of the
calibration activations max|X_j| and of the group's weights max|W_j| (over rows of all its
linears):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          alpha = 0.5 by default

then X' = X / s (folded into the predecessor: a norm's weight/bias or a linear's rows) and
W' = W * s (the linears' input columns), exact in float (methods/fold.py). The smoothed
weights are rounded to int8 per output channel (RTN) and activations are quantized to int8 at
run time per token (dynamic; default) or with one static per-tensor scale per linear from
the calibration maxima of X' (`static_act=True`, stored as the layer's `act_scale` buffer).

Groups: norm -> q/k/v, norm -> gate/up, and the linear predecessors v_proj -> o_proj (GQA:
s has v_proj's out size, the activation/weight maxima of o_proj's repeated head columns are
reduced by max) and up_proj -> down_proj (SiLU(gate) * up is linear in up). The original paper
smooths only the norm-fed groups (`groups="norm"`). Linears without a foldable predecessor
(GPT-2's c_proj, Phi-3's o_proj/down_proj) are quantized without smoothing. Statistics come
from the layer-by-layer pipeline (methods/layerwise.py), so block i sees the inputs produced
by the already-quantized blocks before it.

Mixed precision (`weight_only="down_proj"`): the named linears keep int8 per-channel weights
but float activations (the `w8` scheme, recorded per module in the manifest); their groups are
not smoothed. On SmolLM2-135M the down_proj inputs (SiLU(gate) * up) carry the outliers that
per-token int8 cannot hold even after smoothing (docs/results/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..formats.grid import QuantizedWeight, quantize_weight
from ..formats.scheme import Scheme
from .fold import expand_to_consumer, fold_input_scale, group_layout, reduce_to_prev
from .registry import Method, register_method


@dataclass(frozen=True)
class SmoothQuantParams:
    alpha: float = 0.5  # migration strength: 0 = no smoothing, 1 = all difficulty to the weights
    groups: str = "all"  # "all" foldable groups, or "norm" (only norm-fed groups, as the paper)
    static_act: bool = False  # one calibrated per-tensor activation scale per linear (else per token)
    min_value: float = 1e-5  # floor of max|X_j| and max|W_j| (dead channels)
    batch_size: int = 8  # calibration windows per block forward
    # comma-separated linear names (e.g. "down_proj") kept int8 weight-only (w8, float activations):
    # mixed precision for the layers whose inputs keep outliers that smoothing cannot absorb
    weight_only: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.groups not in ("all", "norm"):
            raise ValueError(f"groups must be 'all' or 'norm', got {self.groups!r}")
        if self.min_value <= 0 or self.batch_size < 1:
            raise ValueError("min_value must be > 0 and batch_size >= 1")

    def weight_only_names(self) -> list[str]:
        return [n.strip() for n in self.weight_only.split(",") if n.strip()]

    def is_weight_only(self, linear_name: str) -> bool:
        return any(_names_linear(entry, linear_name) for entry in self.weight_only_names())


def _names_linear(entry: str, linear_name: str) -> bool:
    """A weight_only entry names a linear by its full or trailing dotted name ("down_proj", "mlp.down_proj")."""
    return linear_name == entry or linear_name.endswith("." + entry)


def smoothing_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, floor: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); act_max, w_max (in,) -> s (in,)."""
    return act_max.clamp_min(floor).pow(alpha) / w_max.clamp_min(floor).pow(1.0 - alpha)


def _outlier_ratio(v: torch.Tensor) -> float:
    """max / median of per-channel maxima: how much one int8 scale per row is wasted."""
    return round((v.max() / v.median().clamp_min(1e-12)).item(), 2)


def _smooth_group(ctx, group: tuple[str, ...], scale_group, params: SmoothQuantParams) -> tuple[torch.Tensor, dict]:
    """Compute and fold one group's scale. -> (s expanded to the linears' inputs, statistics)."""
    from ..pipeline import linear_weight

    n_rep, head_dim = group_layout(ctx.block, scale_group)
    act_max = reduce_to_prev(ctx.stats[group].abs_max, n_rep, head_dim)  # (prev out,)
    w_max = torch.stack([reduce_to_prev(linear_weight(ctx.block.get_submodule(n)).float().abs().amax(0),
                                        n_rep, head_dim) for n in group]).amax(0)
    s = smoothing_scale(act_max, w_max, params.alpha, params.min_value)
    fold_input_scale(ctx.block, scale_group, ctx.facts, s)
    info = {"act_outlier_ratio": _outlier_ratio(act_max), "act_outlier_ratio_smoothed": _outlier_ratio(act_max / s),
            "weight_outlier_ratio": _outlier_ratio(w_max), "weight_outlier_ratio_smoothed": _outlier_ratio(w_max * s),
            "s_min": round(s.min().item(), 4), "s_max": round(s.max().item(), 4)}
    return expand_to_consumer(s, n_rep, head_dim), info


def smoothquant_block_solver(scheme: Scheme, params: SmoothQuantParams, report: dict):
    from ..pipeline import linear_weight

    stats_report = report.setdefault("smoothquant", {"groups": {}, "unsmoothed": [], "weight_only": []})
    weight_only_scheme = replace(scheme, act_bits=None)  # same int8 per-channel weights, float activations

    def solve(ctx) -> dict[str, QuantizedWeight]:
        scales: dict[tuple[str, ...], torch.Tensor] = {}
        for group in ctx.groups:  # forward order; folding only rescales, so all scales go in first
            sg = ctx.group_prev.get(group)
            key = f"{ctx.prefix}:{','.join(group)}"
            # weight-only layers read float activations: smoothing would only make their weights harder
            if sg is None or tuple(sg.linears) != group or (params.groups == "norm" and sg.prev_kind != "norm") \
                    or params.alpha == 0.0 or all(params.is_weight_only(n) for n in group):
                stats_report["unsmoothed"].append(key)
                continue
            scales[group], stats_report["groups"][key] = _smooth_group(ctx, group, sg, params)
        chosen: dict[str, QuantizedWeight] = {}
        for group in ctx.groups:
            s = scales.get(group)
            act_max = ctx.stats[group].abs_max if s is None else ctx.stats[group].abs_max / s
            for name in group:
                weight = linear_weight(ctx.block.get_submodule(name)).float()
                if params.is_weight_only(name):
                    chosen[name] = quantize_weight(weight_only_scheme, weight)
                    stats_report["weight_only"].append(f"{ctx.prefix}.{name}")
                    continue
                qw = quantize_weight(scheme, weight)
                if params.static_act:
                    qw.act_scale = (act_max.max().clamp_min(params.min_value) / 127.0).reshape(1)
                chosen[name] = qw
        return chosen

    return solve


def run(model, targets, scheme: Scheme, params: SmoothQuantParams, calib, *, progress: bool = True,
        report: dict | None = None) -> dict[str, QuantizedWeight]:
    from .layerwise import run_layerwise_with_leftovers

    report = report if report is not None else {}
    for entry in params.weight_only_names():
        if not any(_names_linear(entry, name) for name in targets):
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in targets})
            raise ValueError(f"smoothquant weight_only={entry!r} matches no layer to quantize; "
                             f"linear names here: {', '.join(leaf_names)}")
    chosen = run_layerwise_with_leftovers(
        model, targets, calib, smoothquant_block_solver(scheme, params, report), scheme=scheme,
        batch_size=params.batch_size, want_hessian=False, progress=progress, report=report,
        desc=f"smoothquant {scheme.name}")
    _summarise(report.get("smoothquant", {}))
    return chosen


def _summarise(sq: dict) -> None:
    groups = sq.get("groups", {})
    if not groups:
        return
    before = torch.tensor([g["act_outlier_ratio"] for g in groups.values()])
    after = torch.tensor([g["act_outlier_ratio_smoothed"] for g in groups.values()])
    sq["summary"] = {"smoothed_groups": len(groups), "unsmoothed_groups": len(sq.get("unsmoothed", [])),
                     "weight_only_linears": len(sq.get("weight_only", [])),
                     "act_outlier_ratio_median": round(before.median().item(), 2),
                     "act_outlier_ratio_smoothed_median": round(after.median().item(), 2),
                     "act_outlier_ratio_max": round(before.max().item(), 2),
                     "act_outlier_ratio_smoothed_max": round(after.max().item(), 2)}


def supports(scheme: Scheme) -> bool:
    return scheme.act_bits == 8


register_method(Method(
    name="smoothquant",
    params_cls=SmoothQuantParams,
    needs_calibration=True,
    run=run,
    supports=supports,
    description="SmoothQuant: fold activation outliers into weights, int8 weights x int8 activations (w8a8 only)",
    schemes="w8a8 only (for weight-only schemes use rtn, hqq, gptq or awq)",
))
