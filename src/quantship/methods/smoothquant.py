"""SmoothQuant (Xiao et al., 2023) for w8a8: migrate activation outliers into the weights.

Activations of LLMs have a few input channels with huge magnitudes, so one int8 scale per
token wastes most levels on them; weights are flat. For every group of linears fed by a
foldable predecessor (architecture table), with the per-input-channel absolute maxima of the
calibration activations max|X_j| and of the group's weights max|W_j| (over rows of all its
linears):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          alpha = 0.5 when not searched

then X' = X / s (folded into the predecessor: a norm's weight/bias or a linear's rows) and
W' = W * s (the linears' input columns), exact in float (methods/fold.py). By default alpha is
searched per group (`alpha_search`): the grid point minimising the group's output error
|| X W^T - Q_a(X / s) Q_w(W s)^T ||^2 on calibration rows. The smoothed weights are rounded to
int8 per output channel by a weight quantizer chosen by name (`quantizer`, its params as
`QUANTIZER.key`): GPTQ against the smoothed inputs' Hessian H / (s s^T) (default, `gptq`, with
percdamp 0.1 and the Hessian of the float statistics pass) or to nearest (`rtn`, optionally
with `clip`), and activations are
quantized to int8 at run time per token (dynamic; default) or with one static per-tensor scale per linear from
the calibration maxima of X' (`static_act=True`, stored as the layer's `act_scale` buffer).

Groups: norm -> q/k/v, norm -> gate/up, and the linear predecessors v_proj -> o_proj (GQA:
s has v_proj's out size, the activation/weight maxima of o_proj's repeated head columns are
reduced by max) and up_proj -> down_proj (SiLU(gate) * up is linear in up). The original paper
smooths only the norm-fed groups (`groups="norm"`). Linears without a foldable predecessor
(GPT-2's c_proj, Phi-3's o_proj/down_proj) are quantized without smoothing. Statistics come
from the layer-by-layer pipeline (methods/layerwise.py), so block i sees the inputs produced
by the already-quantized blocks before it.

Mixed precision (a w8a8 default with an override, `--override down_proj=w8`): layers given a
weight-only scheme keep float activations and are rounded to nearest on their scheme (recorded
per module in the manifest); groups of only such layers are not smoothed. On SmolLM2-135M the down_proj inputs (SiLU(gate) * up) carry the outliers that
per-token int8 cannot hold even after smoothing (docs/results/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats.grid import QuantizedWeight, quantize_weight
from ..formats.linear import quantize_activations
from ..formats.scheme import Scheme
from .fold import expand_to_consumer, fold_input_scale, group_layout, reduce_to_prev
from .registry import Method, TransformParams, register_method


@dataclass(frozen=True)
class SmoothQuantParams(TransformParams):
    # GPTQ inside SmoothQuant: stronger dampening, and each group's Hessian from the block's float
    # statistics pass (the smoothing scales are computed from that pass too)
    QUANTIZER_DEFAULTS: ClassVar[dict] = {"gptq": {"percdamp": 0.1, "true_sequential": False}}
    RETIRED: ClassVar[dict[str, str]] = {
        "weight_only": "per-layer schemes are overrides now: keep the w8a8 default and give those layers a "
                       "weight-only scheme, e.g. --override 'down_proj=w8' (API: overrides={'down_proj': 'w8'})",
        "weight_method": "the weight quantizer is chosen by name: --param quantizer=rtn or --param quantizer=gptq",
        "percdamp": "it is GPTQ's own parameter now: --param gptq.percdamp=VALUE",
    }

    quantizer: str = "gptq"  # rounds the smoothed w8a8 weights: gptq or rtn (its params as QUANTIZER.KEY)
    alpha: float = 0.5  # migration strength: 0 = no smoothing, 1 = all difficulty to the weights
    # per-group alpha search: alpha from alpha_min, alpha_min + alpha_step, ..., alpha_max (plus `alpha`
    # itself) minimising the group's w8a8 output error on calibration rows; `alpha` when off.
    # On by default with quantizer gptq: the search moves more of each group's outliers into the
    # weights and GPTQ absorbs the weight error that costs; neither alone does both
    # (docs/results/methods.md, W8A8)
    alpha_search: bool = True
    alpha_min: float = 0.3
    alpha_max: float = 0.9
    alpha_step: float = 0.05
    sample_tokens: int = 1024  # calibration rows per group kept for the alpha search and clip
    clip: bool = False  # quantizer rtn: per-row int8 range shrink minimising the output error on calibration rows
    groups: str = "all"  # "all" foldable groups, or "norm" (only norm-fed groups, as the paper)
    static_act: bool = False  # one calibrated per-tensor activation scale per linear (else per token)
    min_value: float = 1e-5  # floor of max|X_j| and max|W_j| (dead channels)
    batch_size: int = 8  # calibration windows per block forward

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.groups not in ("all", "norm"):
            raise ValueError(f"groups must be 'all' or 'norm', got {self.groups!r}")
        if self.min_value <= 0 or self.batch_size < 1:
            raise ValueError("min_value must be > 0 and batch_size >= 1")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got alpha_min={self.alpha_min}, "
                             f"alpha_max={self.alpha_max}")
        if self.quantizer == "gptq" and self.quantizer_params.true_sequential:
            raise ValueError("smoothquant: GPTQ takes each group's Hessian from the block's float statistics pass; "
                             "gptq.true_sequential must be false")
        if self.quantizer == "rtn" and self.clip and self.quantizer_params.clip_search:
            raise ValueError("smoothquant: clip (the output-error clipping search) and rtn.clip_search (the "
                             "weight-MSE one) both choose the range; keep one")
        if self.alpha_step <= 0 or self.sample_tokens < 1:
            raise ValueError(f"alpha_step must be > 0 and sample_tokens >= 1, got alpha_step={self.alpha_step}, "
                             f"sample_tokens={self.sample_tokens}")

    def alpha_grid(self) -> list[float]:
        """The alphas the search tries: the grid from alpha_min to alpha_max, and `alpha` itself
        (so the chosen alpha never has a larger calibration error than the fixed one)."""
        n = int(round((self.alpha_max - self.alpha_min) / self.alpha_step + 1e-9))
        grid = {round(min(self.alpha_min + k * self.alpha_step, self.alpha_max), 6) for k in range(n + 1)}
        return sorted(grid | {self.alpha_max, self.alpha})

    @property
    def needs_samples(self) -> bool:
        return self.alpha_search or (self.clip and self.quantizer == "rtn")


def smoothing_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float, floor: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); act_max, w_max (in,) -> s (in,)."""
    return act_max.clamp_min(floor).pow(alpha) / w_max.clamp_min(floor).pow(1.0 - alpha)


def _outlier_ratio(v: torch.Tensor) -> float:
    """max / median of per-channel maxima: how much one int8 scale per row is wasted."""
    return round((v.max() / v.median().clamp_min(1e-12)).item(), 2)


def fake_quant_w8a8(scheme: Scheme, x: torch.Tensor, w: torch.Tensor, static_max: float | None = None
                    ) -> torch.Tensor:
    """Q_a(x) Q_w(w)^T as the w8a8 layer computes it; x (T, in), w (out, in) -> (T, out).

    Activations per token (dynamic) or with one scale from static_max (static_act)."""
    static = None if static_max is None else torch.tensor(max(static_max, 1e-8) / 127.0)
    codes, a_scale = quantize_activations(x, scheme.act_bits, static)
    return (codes * a_scale) @ quantize_weight(scheme, w).dequantize().t()


@torch.no_grad()
def search_alpha(x: torch.Tensor, w: torch.Tensor, act_max: torch.Tensor, w_max: torch.Tensor, scheme: Scheme,
                 params: SmoothQuantParams, expand=lambda s: s) -> tuple[float, torch.Tensor, dict[float, float]]:
    """Alpha on params.alpha_grid() minimising the group's output error on calibration rows:

        E(alpha) = mean || x W^T - Q_a(x / s) Q_w(W s)^T ||^2,   s = s(alpha) as smoothing_scale

    x (T, in) the group's inputs, w (out, in) its linears' rows stacked; act_max, w_max (prev,)
    in the predecessor's channel space, expand maps a scale onto w's inputs (GQA). -> (alpha, s, errors)."""
    ref = x @ w.t()  # (T, out)
    errors: dict[float, float] = {}
    best = (float("inf"), params.alpha, None)
    for alpha in params.alpha_grid():
        s = smoothing_scale(act_max, w_max, alpha, params.min_value)
        s_in = expand(s)
        static_max = (expand(act_max) / s_in).max().item() if params.static_act else None
        err = (fake_quant_w8a8(scheme, x / s_in, w * s_in, static_max) - ref).pow(2).mean().item()
        errors[alpha] = err
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


def _smooth_group(ctx, group: tuple[str, ...], scale_group, scheme: Scheme, params: SmoothQuantParams
                  ) -> tuple[torch.Tensor, dict]:
    """Compute (fixed or searched alpha) and fold one group's scale. -> (s expanded to the linears' inputs, statistics)."""
    from ..pipeline import linear_weight

    n_rep, head_dim = group_layout(ctx.block, scale_group)
    act_max = reduce_to_prev(ctx.stats[group].abs_max, n_rep, head_dim)  # (prev out,)
    weights = [linear_weight(ctx.block.get_submodule(n)).float() for n in group]
    w_max = torch.stack([reduce_to_prev(w.abs().amax(0), n_rep, head_dim) for w in weights]).amax(0)
    info: dict = {}
    if params.alpha_search:
        alpha, s, errors = search_alpha(ctx.stats[group].sample(), torch.cat(weights), act_max, w_max, scheme,
                                        params, expand=lambda v: expand_to_consumer(v, n_rep, head_dim))
        info = {"alpha": alpha, "error": _sig(errors[alpha]), f"error_alpha_{params.alpha}": _sig(errors[params.alpha])}
    else:
        s = smoothing_scale(act_max, w_max, params.alpha, params.min_value)
    fold_input_scale(ctx.block, scale_group, ctx.facts, s)
    info |= {"act_outlier_ratio": _outlier_ratio(act_max), "act_outlier_ratio_smoothed": _outlier_ratio(act_max / s),
             "weight_outlier_ratio": _outlier_ratio(w_max), "weight_outlier_ratio_smoothed": _outlier_ratio(w_max * s),
             "s_min": round(s.min().item(), 4), "s_max": round(s.max().item(), 4)}
    return expand_to_consumer(s, n_rep, head_dim), info


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def smoothquant_block_solver(params: SmoothQuantParams, report: dict):
    from ..pipeline import linear_weight

    stats_report = report.setdefault("smoothquant", {"groups": {}, "unsmoothed": [], "weight_only": []})

    def solve(ctx) -> dict[str, QuantizedWeight]:
        def weight_only(name: str) -> bool:  # a layer given a weight-only scheme (an override) reads float activations
            return ctx.schemes[name].act_bits is None

        scales: dict[tuple[str, ...], torch.Tensor] = {}
        for group in ctx.groups:  # forward order; folding only rescales, so all scales go in first
            sg = ctx.group_prev.get(group)
            key = f"{ctx.prefix}:{','.join(group)}"
            # weight-only layers read float activations: smoothing would only make their weights harder
            if sg is None or tuple(sg.linears) != group or (params.groups == "norm" and sg.prev_kind != "norm") \
                    or (params.alpha == 0.0 and not params.alpha_search) or all(weight_only(n) for n in group):
                stats_report["unsmoothed"].append(key)
                continue
            scheme = next(ctx.schemes[n] for n in group if not weight_only(n))  # the group's w8a8
            scales[group], stats_report["groups"][key] = _smooth_group(ctx, group, sg, scheme, params)
        chosen: dict[str, QuantizedWeight] = {}
        for group in ctx.groups:
            s = scales.get(group)
            act_max = ctx.stats[group].abs_max if s is None else ctx.stats[group].abs_max / s
            names = [n for n in group if not weight_only(n)]
            for name in group:
                if name not in names:
                    chosen[name] = quantize_weight(ctx.schemes[name], linear_weight(ctx.block.get_submodule(name)))
                    stats_report["weight_only"].append(f"{ctx.prefix}.{name}")
            if not names:
                continue
            weights = [linear_weight(ctx.block.get_submodule(n)).float() for n in names]
            schemes = [ctx.schemes[n] for n in names]
            for name, qw in zip(names, _round_group(ctx, group, names, weights, s, schemes, params, report)):
                if params.static_act:
                    qw.act_scale = (act_max.max().clamp_min(params.min_value) / 127.0).reshape(1)
                chosen[name] = qw
        return chosen

    return solve


def _round_group(ctx, group, names, weights, s, schemes: list[Scheme], params: SmoothQuantParams, report: dict
                 ) -> list[QuantizedWeight]:
    """Round the smoothed weights of one group's int8 x int8 linears with the quantizer: GPTQ
    against the smoothed inputs' Hessian H / (s s^T), or nearest (optionally with an output-error
    clip per row, else rtn with its own params)."""
    if params.quantizer == "gptq":
        from .gptq import quantize_group_gptq

        h = ctx.stats[group].mean_hessian()
        h = h if s is None else h / torch.outer(s, s)
        return quantize_group_gptq(weights, h, schemes, params.quantizer_params,
                                   [f"{ctx.prefix}.{n}" for n in names], report)
    from .rtn import rtn_quantize_weight

    if not params.clip:
        return [rtn_quantize_weight(w, scheme, params.quantizer_params) for w, scheme in zip(weights, schemes)]
    x = ctx.stats[group].sample()
    x = x if s is None else x / s  # (T, in): the inputs the smoothed weights see
    return [quantize_weight(scheme, w, output_clip_ratio(w, x, scheme)) for w, scheme in zip(weights, schemes)]


@torch.no_grad()
def output_clip_ratio(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, grid: int = 20, clip_min: float = 0.5
                      ) -> torch.Tensor:
    """Per-row range shrink r in [clip_min, 1] minimising sum_t ((W - Q(W; r)) x_t)^2. -> (out, 1)."""
    from .rtn import best_clip_ratio

    return best_clip_ratio(scheme, w, grid, clip_min, lambda d: (x @ d.t()).pow(2).sum(0).unsqueeze(1))


def run(model, targets, schemes: dict[str, Scheme], params: SmoothQuantParams, calib, *, progress: bool = True,
        report: dict | None = None) -> dict[str, QuantizedWeight]:
    from ..pipeline import schemes_label
    from .layerwise import run_layerwise_with_leftovers

    report = report if report is not None else {}
    chosen = run_layerwise_with_leftovers(
        model, targets, calib, smoothquant_block_solver(params, report), schemes=schemes,
        batch_size=params.batch_size, want_hessian=params.quantizer == "gptq", progress=progress,
        report=report, sample_tokens=params.sample_tokens if params.needs_samples else 0,
        desc=f"smoothquant+{params.quantizer} {schemes_label(schemes)}")
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
    searched: dict[str, list[float]] = {}
    for key, g in groups.items():
        if "alpha" in g:
            searched.setdefault(key.split(":", 1)[1], []).append(g["alpha"])
    if searched:  # the alphas chosen per kind of group, in block order
        sq["summary"]["alpha_by_group"] = searched


def supports(scheme: Scheme) -> bool:
    return scheme.act_bits == 8


register_method(Method(
    name="smoothquant",
    params_cls=SmoothQuantParams,
    needs_calibration=True,
    run=run,
    supports=supports,
    # a layer may be kept weight-only by an override (mixed precision: --override down_proj=w8)
    supports_override=lambda scheme: True,
    quantizer_rounds=lambda scheme: scheme.act_bits is not None,  # weight-only layers are rounded to nearest
    description="SmoothQuant: fold activation outliers into weights, int8 weights x int8 activations (w8a8), "
                "then a weight quantizer (gptq default, or rtn)",
    schemes="w8a8 as the default scheme (overrides may keep layers weight-only; for weight-only models use rtn, "
            "hqq, gptq or awq)",
))
