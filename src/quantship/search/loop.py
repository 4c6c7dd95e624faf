"""The search: sensitivities -> assignment -> quantize the mix, measure, promote, repeat.

Under a bits budget (`max_bpw`, the manifest's bits_per_weight.quantized_layers) the first mix is
the least-predicted-loss assignment. When its measured KLD misses the prediction by more than
`tolerance` (the additive assumption failed), the groups with the largest predicted loss are
promoted one rung (pinned at or above it) and the assignment is solved again within the budget;
the best measured mix is kept. Under a quality budget (`max_kld`) the first mix is the fewest bits
predicted to hold it; while the measured KLD exceeds it, the worst groups are promoted and the
least-bits assignment is solved again against the limit rescaled by measured/predicted, until it
holds or every group is at the ladder's most precise rung. Each iteration is logged.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats.scheme import Scheme, parse_scheme
from .assign import Assignment, solve_max_bits, solve_min_bits
from .sensitivity import Group
from .spec import DEFAULT_LADDER, SearchSpec  # noqa: F401  (re-exported)

@dataclass
class Iteration:
    index: int
    choice: tuple[int, ...]
    bits_per_weight: float
    predicted: float
    measured: float
    holds: bool
    action: str = ""

    def to_json(self, rungs: list[str], groups: list[Group]) -> dict:
        return {"iteration": self.index, "bits_per_weight": round(self.bits_per_weight, 4),
                "predicted_kld": self.predicted, "measured_kld": self.measured, "holds": self.holds,
                "action": self.action, "schemes": _counts(self.choice, rungs, groups)}


@dataclass
class SearchResult:
    spec: SearchSpec
    source: str
    groups: list[Group]
    rungs: list[str]  # most bits first
    bits: list[list[int | None]]
    loss: list[list[float | None]]
    iterations: list[Iteration]
    final: Iteration
    calibration: dict
    timings: dict[str, float] = field(default_factory=dict)
    artifact: str | None = None
    quantized: Any = None  # the final QuantResult (model in memory)

    @property
    def overrides(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return mix_overrides(self.groups, [self.rungs[r] for r in self.final.choice])

    def to_json(self) -> dict:
        default, overrides = self.overrides
        spec = self.spec
        target = {"max_bpw": spec.max_bpw} if spec.max_bpw is not None else {"kld_mean": spec.max_kld}
        layers = []
        for g, (group, r) in enumerate(zip(self.groups, self.final.choice)):
            for name in group.layers:
                layers.append({"layer": name, "group": group.name, "scheme": self.rungs[r],
                               "group_bits_per_weight": round(self.bits[g][r] / group.weights, 4),
                               "group_predicted_kld": self.loss[g][r]})
        return {
            "model": spec.model, "source": self.source, "method": spec.method,
            "method_params": dict(spec.method_params), "ladder": list(self.rungs), "target": target,
            "sensitivity": {"kind": spec.sensitivity, "unit": "mean KLD per calibration token (nats)",
                            "groups": [{"name": g.name, "layers": list(g.layers), "weights": g.weights,
                                        "loss": dict(zip(self.rungs, row))}
                                       for g, row in zip(self.groups, self.loss)]},
            "calibration": {k: v for k, v in self.calibration.items() if k not in ("window_hashes", "shingles64")},
            "iterations": [it.to_json(self.rungs, self.groups) for it in self.iterations],
            "final": {**self.final.to_json(self.rungs, self.groups), "default_scheme": default,
                      "overrides": [list(o) for o in overrides], "layers": layers},
            "artifact": self.artifact,
            "timings": self.timings,
        }


def _counts(choice, rungs, groups) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g, r in enumerate(choice):
        counts[rungs[r]] = counts.get(rungs[r], 0) + len(groups[g].layers)
    return counts


def mix_overrides(groups: list[Group], schemes: list[str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """-> (default scheme: the one covering most weights, one anchored override per other group)."""
    weight: dict[str, int] = {}
    for group, s in zip(groups, schemes):
        weight[s] = weight.get(s, 0) + group.weights
    default = max(weight, key=lambda s: weight[s])
    overrides = []
    for group, s in zip(groups, schemes):
        if s == default:
            continue
        parent = group.layers[0].rsplit(".", 1)[0]
        leaves = [n.rsplit(".", 1)[1] for n in group.layers]
        same_parent = all(n.rsplit(".", 1)[0] == parent for n in group.layers)
        if same_parent and len(leaves) > 1:
            pattern = f"^{re.escape(parent)}\\.(?:{'|'.join(map(re.escape, leaves))})$"
            overrides.append((pattern, s))
        else:
            overrides.extend((f"^{re.escape(n)}$", s) for n in group.layers)
    return default, tuple(overrides)


def promotable(bits_row, r: int) -> int | None:
    """The rung with the fewest bits above rung r's (None: r is the most precise this group has)."""
    here = bits_row[r]
    above = [(b, i) for i, b in enumerate(bits_row) if b is not None and b > here]
    return min(above)[1] if above else None


def promote_worst(bits, loss, choice, pins: dict[int, int], k: int) -> list[int]:
    """Pin the k groups with the largest predicted loss at their rung (and a rung above) to at least
    the next rung up. -> the promoted groups (empty: the ladder is exhausted)."""
    ranked = sorted(range(len(choice)), key=lambda g: -loss[g][choice[g]])
    promoted = []
    for g in ranked:
        up = promotable(bits[g], choice[g])
        if up is None:
            continue
        pins[g] = max(pins.get(g, 0), bits[g][up])
        promoted.append(g)
        if len(promoted) == k:
            break
    return promoted


def pinned(bits, pins: dict[int, int]):
    """The bits table with rungs below each pinned group's floor removed."""
    return [[b if (b is not None and b >= pins.get(g, 0)) else None for b in row] for g, row in enumerate(bits)]


def run_search(spec: SearchSpec, *, out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
               log=print) -> SearchResult:
    """Search a mix for spec.model; write its artifact to `out` when given."""
    import torch

    from .. import api
    from ..calib import build_calibration
    from ..methods.registry import get_method
    from ..models.arch import arch_facts
    from ..models.load import load_model, resolve_model
    from ..pipeline import find_targets
    from ..specs import QuantSpec
    from .sensitivity import (Reference, _weight, fisher_diagonal, fisher_table, group_bits, kld_table,
                              layer_groups)

    started = time.perf_counter()
    method = get_method(spec.method)
    params = method.make_params(dict(spec.method_params))
    for scheme in spec.schemes:
        method.check_scheme(scheme, params)
    if out is not None:
        api._check_replace(out, overwrite, source=None)
    source = resolve_model(spec.model, log=log)
    model, tokenizer = load_model(source, dtype=torch.float32, log=log)
    qspec = QuantSpec(scheme=spec.ladder[0], method=spec.method, method_params=spec.method_params, calib=spec.calib,
                      calib_samples=spec.calib_samples, calib_seqlen=spec.calib_seqlen, seed=spec.seed)
    targets = find_targets(model, arch_facts(model.config.model_type), qspec)
    groups = layer_groups(model, targets)
    schemes = sorted(spec.schemes, key=lambda s: -sum(group_bits(g, targets, s) or 0 for g in groups))
    rungs = [s.name for s in schemes]
    bits = [[group_bits(g, targets, s) for s in schemes] for g in groups]
    for group, row in zip(groups, bits):
        if all(b is None for b in row):
            widths = sorted({int(_weight(targets[n]).shape[1]) for n in group.layers})
            raise ValueError(f"no rung of --ladder {','.join(rungs)} can store {group.name} (input width "
                             f"{widths}: a group size must divide it); add a rung it fits, e.g. w8")
    weights = sum(g.weights for g in groups)
    floor = sum(min(b for b in row if b is not None) for row in bits) / weights
    if spec.max_bpw is not None and spec.max_bpw * weights < floor * weights:
        raise ValueError(f"--max-bpw {spec.max_bpw} is below the cheapest mix of this ladder: {floor:.4f} bits per "
                         f"weight (every layer at its cheapest rung of {','.join(rungs)}); raise --max-bpw or add "
                         f"a cheaper rung")

    calib = build_calibration(qspec, model, tokenizer)
    timings: dict[str, float] = {"load_s": round(time.perf_counter() - started, 3)}
    t0 = time.perf_counter()
    reference = Reference(model, calib.tokens)
    quantizer = method.quantize_weight or get_method("rtn").quantize_weight
    q_params = params if method.quantize_weight else get_method("rtn").make_params({})
    if spec.sensitivity == "kld":
        loss = kld_table(model, targets, groups, schemes, reference, quantizer, q_params, progress=progress)
    else:
        fisher, n_tok = fisher_diagonal(model, targets, calib.tokens, seed=spec.seed, progress=progress)
        loss = fisher_table(targets, groups, schemes, fisher, n_tok, quantizer, q_params)
        del fisher
    timings["sensitivity_s"] = round(time.perf_counter() - t0, 3)
    loss_filled = [[v if v is not None else math.inf for v in row] for row in loss]

    k = spec.promote or max(1, math.ceil(0.05 * len(groups)))
    pins: dict[int, int] = {}
    iterations: list[Iteration] = []
    limit = spec.max_kld
    results = {}
    t0 = time.perf_counter()
    assignment = _solve(spec, bits, loss_filled, weights, limit)
    for index in range(spec.max_iters):
        overrides_default, overrides = mix_overrides(groups, [rungs[r] for r in assignment.choice])
        quantized = api.quantize((model, tokenizer), overrides_default, method=spec.method,
                                 method_params=dict(spec.method_params), overrides=overrides, calib=spec.calib,
                                 seed=spec.seed, source=source, progress=False, log=log)
        measured = reference.kld(quantized.model)
        bpw = assignment.bits / weights
        if spec.max_bpw is not None:
            holds = measured <= assignment.loss * (1 + spec.tolerance)
        else:
            holds = measured <= spec.max_kld
        it = Iteration(index, assignment.choice, bpw, assignment.loss, measured, holds)
        iterations.append(it)
        results[index] = quantized
        if holds:
            it.action = "holds"
            _log_iterations(iterations, spec, log)
            break
        promoted = promote_worst(bits, loss_filled, assignment.choice, pins, k)
        if not promoted:
            it.action = "ladder exhausted"
            _log_iterations(iterations, spec, log)
            break
        try:
            if spec.max_kld is not None:
                limit = limit * assignment.loss / measured if measured > 0 else limit
            nxt = _solve(spec, pinned(bits, pins), loss_filled, weights, limit)
        except ValueError:
            it.action = "ladder exhausted within the bits budget"
            _log_iterations(iterations, spec, log)
            break
        it.action = "promote " + ", ".join(groups[g].name for g in promoted)
        _log_iterations(iterations, spec, log)
        if nxt.choice == assignment.choice:  # the pins changed nothing the solver would choose
            break
        assignment = nxt
        if index == spec.max_iters - 1:
            it.action += " (max iterations)"
    timings["loop_s"] = round(time.perf_counter() - t0, 3)
    final = _pick(iterations, spec)
    result = SearchResult(spec, str(source), groups, rungs, bits, loss, iterations, final, calib.info, timings,
                          quantized=results[final.index])
    if out is not None:
        from ..artifact import write_artifact

        result.artifact = str(write_artifact(results[final.index], out, overwrite=overwrite))
    timings["wall_s"] = round(time.perf_counter() - started, 3)
    return result


def _solve(spec: SearchSpec, bits, loss, weights: int, limit: float | None) -> Assignment:
    if spec.max_bpw is not None:
        return solve_max_bits(bits, loss, math.floor(spec.max_bpw * weights + 1e-6))
    return solve_min_bits(bits, loss, limit)


def _pick(iterations: list[Iteration], spec: SearchSpec) -> Iteration:
    """max_bpw: the least measured KLD (all fit the budget). Quality budget: the fewest bits among
    the mixes that hold it, else (none holds) the least measured KLD."""
    if spec.max_kld is not None:
        holding = [it for it in iterations if it.holds]
        if holding:
            return min(holding, key=lambda it: it.bits_per_weight)
    return min(iterations, key=lambda it: it.measured)


def _log_iterations(iterations: list[Iteration], spec: SearchSpec, log) -> None:
    from rich.table import Table

    from ..report import console

    target = f"max bpw {spec.max_bpw}" if spec.max_bpw is not None else f"kld_mean <= {spec.max_kld}"
    table = Table(title=f"search iterations ({target}; KLD on the calibration tokens)", header_style="bold")
    for col in ("iter", "bpw", "predicted KLD", "measured KLD", "measured/predicted", "holds", "next"):
        table.add_column(col, justify="left" if col in ("next", "holds") else "right")
    for it in iterations:
        ratio = it.measured / it.predicted if it.predicted > 0 else math.inf
        table.add_row(str(it.index), f"{it.bits_per_weight:.4f}", f"{it.predicted:.5f}", f"{it.measured:.5f}",
                      f"{ratio:.2f}", "yes" if it.holds else "no", it.action)
    if log is not None:
        console.print(table)
