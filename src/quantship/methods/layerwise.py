"""Layer-by-layer calibration: capture block i's inputs, measure its linears' inputs, quantize
the block, re-run it with the quantized weights to make block i+1's inputs (as the reference
GPTQ does), so errors of earlier blocks are seen by later ones. Inside a block a method may go
further (true-sequential GPTQ): quantize its input groups in forward order and recompute each
later group's statistics from the block with the earlier groups' quantized values in place
(BlockContext.collect_group_stats), one forward per batch that stops at the group's input.

Memory stays near the model plus one copy of the calibration hidden states (replaced in place,
batch by batch) plus per-group statistics. Block call arguments (masks, rotary embeddings) are
captured per block from one real forward, because some families (Gemma 3) give different
blocks different masks and position embeddings.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.grid import QuantizedWeight
from ..memory import peak_rss_bytes, release_free_memory, rss_bytes
from ..models.arch import ArchFacts

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured: the rest of the model is not run."""


@dataclass
class InputStats:
    """Running statistics of the input shared by one group of linears.

    hessian: sum of x x^T / tokens (in, in), float32 accumulation (GPTQ's H up to a constant);
    abs_mean: mean |x| per input channel (AWQ's activation salience);
    abs_max: max |x| per input channel (SmoothQuant);
    sample: up to `sample_tokens` rows of x taken at a fixed stride from every batch (AWQ's search)."""

    in_features: int
    want_hessian: bool = True
    sample_per_batch: int = 0
    tokens: int = 0
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    samples: list = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:  # first batch (not `hessian is None`: without a Hessian that reset every batch)
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
            self.abs_max = torch.zeros(self.in_features)
            if self.want_hessian:
                self.hessian = torch.zeros(self.in_features, self.in_features)
        if self.want_hessian:
            self.hessian.addmm_(x.t(), x)
        ax = x.abs()
        self.abs_sum += ax.sum(0, dtype=torch.float64)
        torch.maximum(self.abs_max, ax.amax(0), out=self.abs_max)
        if self.sample_per_batch:
            step = max(1, x.shape[0] // self.sample_per_batch)
            self.samples.append(x[::step][: self.sample_per_batch].clone())
        self.tokens += x.shape[0]

    def mean_hessian(self) -> torch.Tensor:
        if self.hessian is None or not self.tokens:
            raise RuntimeError("no calibration input reached this layer group")
        return self.hessian / self.tokens

    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, self.in_features)


@dataclass
class BlockContext:
    """What a method's block solver gets: the block, its input groups, their float statistics
    (`stats`, empty when the method skipped the float pass) and the block's captured inputs, from
    which `collect_group_stats` recomputes a group's statistics with the block as it is now."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    block: nn.Module
    groups: list[tuple[str, ...]]  # relative names of linears sharing one input, architecture-table order
    facts: ArchFacts
    group_prev: dict[tuple[str, ...], object]  # group -> ScaleGroup (foldable predecessor) when known
    hidden: list[torch.Tensor]  # the block's inputs, one tensor per calibration batch
    calls: list[tuple[tuple, dict]]  # the block's other arguments per batch
    sample_per_batch: int = 0  # rows per batch kept in InputStats.samples
    stats: dict[tuple[str, ...], InputStats] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)  # linears whose quantized values are in the block
    collect_s: float = 0.0  # seconds spent in collect_group_stats
    _order: list[tuple[str, ...]] | None = None

    def collect_stats(self, groups: list[tuple[str, ...]], want_hessian: bool = True
                      ) -> dict[tuple[str, ...], InputStats]:
        """Statistics of every group's input over one forward of the block per batch."""
        stats = {g: self._new_stats(g, want_hessian) for g in groups}
        self._forward_with_input_hooks({g: stats[g].add for g in groups})
        return stats

    @torch.no_grad()
    def collect_group_stats(self, group: tuple[str, ...], want_hessian: bool = True) -> InputStats:
        """Statistics of `group`'s input from the block as it is NOW (quantized values already
        loaded for earlier groups: true-sequential GPTQ). Each batch's forward stops at the
        group's input, so nothing past it runs and no intermediate activation is kept."""
        started = time.perf_counter()
        stats = self._new_stats(group, want_hessian, samples=False)

        def add_and_stop(x):
            stats.add(x)
            raise _StopForward

        self._forward_with_input_hooks({group: add_and_stop})
        self.collect_s += time.perf_counter() - started
        return stats

    @torch.no_grad()
    def groups_in_forward_order(self) -> list[tuple[str, ...]]:
        """The groups in the order the block's forward reaches them (observed on the first batch;
        the architecture table says which linears share an input, not where unfed ones run)."""
        if self._order is None:
            reached: list[tuple[str, ...]] = []
            self._forward_with_input_hooks({g: (lambda x, g=g: reached.append(g)) for g in self.groups},
                                           batches=1)
            self._order = list(dict.fromkeys(reached)) + [g for g in self.groups if g not in reached]
        return self._order

    def load(self, chosen: dict[str, QuantizedWeight]) -> None:
        """Put quantized values (relative names) into the block's float modules."""
        for rel, qw in chosen.items():
            _load_dequantized(self.block.get_submodule(rel), qw)
            self.loaded.add(rel)

    def _new_stats(self, group: tuple[str, ...], want_hessian: bool, samples: bool = True) -> InputStats:
        per_batch = self.sample_per_batch if samples else 0
        return InputStats(_in_features(self.block.get_submodule(group[0])), want_hessian, per_batch)

    @torch.no_grad()
    def _forward_with_input_hooks(self, on_input: dict[tuple[str, ...], Callable], batches: int | None = None
                                  ) -> None:
        """Run the block on the captured inputs, calling on_input[group](x) with each group's input."""
        handles = [self.block.get_submodule(g[0]).register_forward_pre_hook(_input_hook(f))
                   for g, f in on_input.items()]
        try:
            for h, (args, kwargs) in list(zip(self.hidden, self.calls))[:batches]:
                try:
                    self.block(h, *args, **kwargs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()


def _input_hook(on_input: Callable[[torch.Tensor], None]):
    def hook(module, args):
        on_input(args[0])  # returns None: the module's inputs stay as they are
    return hook


# solve(ctx) -> {relative linear name: QuantizedWeight}; may rescale the block's float weights first.
BlockSolver = Callable[[BlockContext], dict[str, QuantizedWeight]]


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int):
    """-> (hidden states of block 0 per batch, {batch size: [(args, kwargs) per block]}).

    One full forward per distinct batch size records every block's extra arguments; every other
    batch stops at block 0."""
    hidden: list[torch.Tensor] = []
    calls_by_size: dict[int, list] = {}
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start: start + batch_size]
        size = batch.shape[0]
        record_all = size not in calls_by_size
        calls: list = [None] * len(blocks)

        def make_hook(i: int):
            def hook(module, args, kwargs):
                kw = dict(kwargs)  # the running forward still needs its own kwargs untouched
                h = args[0] if args else kw.pop("hidden_states")
                if i == 0:
                    hidden.append(h.detach().clone())
                calls[i] = (tuple(args[1:]), kw)
                if not record_all or i == len(blocks) - 1:
                    raise _StopForward
            return hook

        watched = blocks if record_all else blocks[:1]
        handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(watched)]
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if record_all:
            calls_by_size[size] = calls
    return hidden, calls_by_size


def input_groups(facts: ArchFacts, block_targets: list[str]) -> tuple[list[tuple[str, ...]], dict]:
    """Group a block's target linears by shared input using the architecture table; others alone."""
    remaining = list(block_targets)
    groups, prev = [], {}
    for g in facts.groups:
        members = tuple(n for n in g.linears if n in remaining)
        if members:
            groups.append(members)
            prev[members] = g
            remaining = [n for n in remaining if n not in members]
    groups.extend((n,) for n in remaining)
    return groups, prev


def run_layerwise(model: nn.Module, facts: ArchFacts, targets: dict[str, nn.Module], tokens: torch.Tensor,
                  solve: BlockSolver, *, batch_size: int = 4, want_hessian: bool = True, sample_tokens: int = 0,
                  float_stats: bool = True, progress: bool = True, report: dict | None = None,
                  desc: str = "quantize") -> dict[str, QuantizedWeight]:
    """Run `solve` block by block on calibration `tokens` (n, seqlen); returns {target name: weight}.

    float_stats: collect every group's statistics in one float forward of the block before
    `solve` (ctx.stats); a method that collects its own (true-sequential GPTQ) turns it off."""
    blocks = model.get_submodule(facts.blocks)
    started = time.perf_counter()
    hidden, calls_by_size = capture_block_inputs(model, blocks, tokens, batch_size)
    release_free_memory()
    per_batch = math.ceil(sample_tokens / len(hidden)) if sample_tokens else 0
    chosen: dict[str, QuantizedWeight] = {}
    per_block: list[dict] = []
    bar = tqdm(range(len(blocks)), desc=f"{desc} (block by block)", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = blocks[i]
        prefix = f"{facts.blocks}.{i}"
        rel_targets = [n[len(prefix) + 1:] for n in targets if n.startswith(prefix + ".")]
        calls = [calls_by_size[h.shape[0]][i] for h in hidden]
        phases = {}
        if rel_targets:
            groups, prev = input_groups(facts, rel_targets)
            ctx = BlockContext(i, prefix, block, groups, facts, prev, hidden, calls, per_batch)
            if float_stats:
                ctx.stats = ctx.collect_stats(groups, want_hessian)
            t_stats = time.perf_counter()
            solved = solve(ctx)
            ctx.load({rel: qw for rel, qw in solved.items() if rel not in ctx.loaded})
            chosen.update((f"{prefix}.{rel}", qw) for rel, qw in solved.items())
            t_solve = time.perf_counter()
            phases = {"stats_s": round(t_stats - t0, 3), "solve_s": round(t_solve - t_stats, 3)}
            if ctx.collect_s:
                phases["sequential_stats_s"] = round(ctx.collect_s, 3)  # part of solve_s
            del ctx, solved
        t_forward = time.perf_counter()
        with torch.no_grad():  # in place, batch by batch: block i's outputs are block i+1's inputs
            for k, call in enumerate(calls):  # (so one copy of the calibration states is ever held)
                hidden[k] = _first_output(block(hidden[k], *call[0], **call[1]))
        release_free_memory()
        t_end = time.perf_counter()
        if phases:
            phases["forward_s"] = round(t_end - t_forward, 3)
        per_block.append({"block": i, "seconds": round(t_end - t0, 3), **phases, "rss_bytes": rss_bytes()})
        bar.set_postfix(rss=f"{rss_bytes() / 2**20:.0f}MiB")
    if report is not None:
        report["layerwise"] = {
            "blocks": per_block,
            "batch_size": batch_size,
            "calibration_tokens": int(tokens.numel()),
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    return chosen


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]


@torch.no_grad()
def _load_dequantized(module: nn.Module, qw: QuantizedWeight) -> None:
    """Put the quantized values into the float module so the block's re-run sees them."""
    w = qw.dequantize()
    if type(module).__name__ == "Conv1D":
        w = w.t()
    module.weight.copy_(w.to(module.weight.dtype))


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Undo a row-wise concatenation of linears quantized together (rows are independent)."""
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        out.append(QuantizedWeight(qw.scheme, qw.codes[rows].contiguous(), qw.scale[rows].contiguous(),
                                   qw.offset[rows].contiguous() if qw.offset is not None else None))
        start += size
    return out


def run_layerwise_with_leftovers(model: nn.Module, targets: dict[str, nn.Module], calib, solve: BlockSolver, *,
                                 scheme, batch_size: int, want_hessian: bool = True, sample_tokens: int = 0,
                                 float_stats: bool = True, progress: bool = True, report: dict | None = None,
                                 desc: str = "quantize") -> dict[str, QuantizedWeight]:
    """run_layerwise over the decoder blocks; targets outside them (lm_head with --quantize-head)
    are rounded to nearest, and the report says so."""
    from ..formats.grid import quantize_weight
    from ..models.arch import arch_facts
    from ..pipeline import linear_weight

    facts = arch_facts(model.config.model_type)
    tokens = calib.tokens if hasattr(calib, "tokens") else torch.as_tensor(calib)
    in_blocks = {n: m for n, m in targets.items() if n.startswith(facts.blocks + ".")}
    chosen = run_layerwise(model, facts, in_blocks, tokens, solve, batch_size=batch_size, want_hessian=want_hessian,
                           sample_tokens=sample_tokens, float_stats=float_stats, progress=progress, report=report,
                           desc=desc)
    outside = [n for n in targets if n not in in_blocks]
    for name in outside:
        chosen[name] = quantize_weight(scheme, linear_weight(targets[name]))
    if outside and report is not None:
        report["rtn_outside_blocks"] = outside
    return chosen
