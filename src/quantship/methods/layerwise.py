"""Layer-by-layer calibration: capture block i's inputs, measure its linears' inputs, quantize
the block, run it with the quantized weights to make block i+1's inputs (as the reference
GPTQ does), so errors of earlier blocks are seen by later ones. Inside a block a method may go
further (true-sequential GPTQ): quantize its input groups in forward order and take each later
group's statistics from the block with the earlier groups' quantized values in place
(BlockContext.collect_group_stats). How the block is run -- whole, or branch by branch with
each part run once -- is methods/block_runner.py's job.

Memory: the calibration hidden states (one copy, updated in place batch by batch), one
branch's cached tail inputs, per-group statistics, and the model -- of which the blocks'
weights are touched one block at a time: capture runs no block, and a finished block's float
weights are released (pages of a memory-mapped checkpoint handed back). Block call arguments
(masks, rotary embeddings) are recorded per block, because some families (Gemma 3) give
different blocks different masks and position embeddings.
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
from ..formats.scheme import Scheme
from ..memory import (peak_rss_bytes, reclaim_context, reclaim_enabled, release_clean_pages, release_free_memory,
                      release_tensor_memory, rss_bytes)
from ..models.arch import ArchFacts, is_transposed
from .block_runner import BlockRunner, StopForward, make_runner

log = logging.getLogger(__name__)


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
    want_abs: bool = True  # mean / max |x| (AWQ, SmoothQuant); GPTQ needs only the Hessian
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
            _add_gram(self.hessian, x)
        if self.want_abs:  # (a fifth of a GPTQ block's statistics time when always on)
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
        return _symmetric_from_upper(self.hessian) / self.tokens

    def abs_mean(self) -> torch.Tensor:
        if not self.want_abs:
            raise RuntimeError("mean |x| was not collected (InputStats(want_abs=False))")
        return (self.abs_sum / max(self.tokens, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, self.in_features)


# From this width on, the Gram matrix x^T x skips its lower-left quarter (3/4 of the work):
# a 2048 x 1536 input measured 0.77x the time of the full product; at 576 no gain.
_GRAM_SPLIT_MIN = 1024


def _add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += x^T x (in, in); wide inputs fill only the top block row and the bottom-right block,
    the rest is its mirror image (_symmetric_from_upper)."""
    n = x.shape[1]
    if n < _GRAM_SPLIT_MIN:
        h.addmm_(x.t(), x)
        return
    half = n // 2
    h[:half].addmm_(x[:, :half].t(), x)
    h[half:, half:].addmm_(x[:, half:].t(), x[:, half:])


def _symmetric_from_upper(h: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    if n < _GRAM_SPLIT_MIN:
        return h
    half = n // 2
    full = h.clone()
    full[half:, :half] = h[:half, half:].t()
    return full


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
    runner: BlockRunner  # runs the block over the calibration batches (methods/block_runner.py)
    schemes: dict[str, Scheme]  # relative linear name -> its own scheme (default or override)
    sample_per_batch: int = 0  # rows per batch kept in InputStats.samples
    stats: dict[tuple[str, ...], InputStats] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)  # linears whose quantized values are in the block
    collect_s: float = 0.0  # seconds spent in collect_group_stats
    _order: list[tuple[str, ...]] | None = None

    def collect_stats(self, groups: list[tuple[str, ...]], want_hessian: bool = True
                      ) -> dict[tuple[str, ...], InputStats]:
        """Statistics of every group's input over one forward of the block per batch."""
        stats = {g: self._new_stats(g, want_hessian) for g in groups}
        self.runner.forward_with_input_hooks({g[0]: stats[g].add for g in groups})
        return stats

    @torch.no_grad()
    def collect_group_stats(self, group: tuple[str, ...], want_hessian: bool = True, want_abs: bool = False
                            ) -> InputStats:
        """Statistics of `group`'s input from the block as it is NOW (quantized values already
        loaded for earlier groups: true-sequential GPTQ). Nothing past the group's input runs.
        Groups are asked for in forward order, each loaded before the next is asked for."""
        started = time.perf_counter()
        stats = self._new_stats(group, want_hessian, samples=False)
        stats.want_abs = want_abs
        self.runner.collect(group, stats.add)
        self.collect_s += time.perf_counter() - started
        return stats

    @torch.no_grad()
    def groups_in_forward_order(self) -> list[tuple[str, ...]]:
        """The groups in the order the block's forward reaches them (from the runner's branches,
        else observed on the first batch: the architecture table says which linears share an
        input, not where unfed ones run)."""
        if self._order is None:
            self._order = self.runner.order()
        if self._order is None:
            reached: list[tuple[str, ...]] = []
            self.runner.forward_with_input_hooks({g[0]: (lambda x, g=g: reached.append(g)) for g in self.groups},
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


# solve(ctx) -> {relative linear name: QuantizedWeight}; may rescale the block's float weights first.
BlockSolver = Callable[[BlockContext], dict[str, QuantizedWeight]]


class _BlockStandIn(nn.Module):
    """Takes a decoder block's place while its call is recorded: returns its input unchanged, so
    the model's layer loop reaches every block without running one (the blocks' weights stay
    untouched: a memory-mapped model is paged in block by block later, not all at once here)."""

    def __init__(self, block: nn.Module, on_call: Callable):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: the stand-in owns no weights
        object.__setattr__(self, "_on_call", on_call)

    def forward(self, *args, **kwargs):
        return self._on_call(args, kwargs)

    def __getattr__(self, name):  # the loop may read block attributes (Gemma 3: attention_type)
        return getattr(object.__getattribute__(self, "_block"), name)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int):
    """-> (hidden states of block 0 per batch, {batch size: [(args, kwargs) per block]}).

    Per batch the model runs up to its layer loop with stand-ins in place of the blocks; the
    first batch of each distinct size records every block's extra arguments (masks and rotary
    embeddings may differ per block: Gemma 3), the others stop at block 0."""
    hidden: list[torch.Tensor] = []
    calls_by_size: dict[int, list] = {}
    originals = list(blocks)
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start: start + batch_size]
        size = batch.shape[0]
        record_all = size not in calls_by_size
        calls: list = [None] * len(blocks)

        def recorder(i: int):
            def on_call(args, kwargs):
                kw = dict(kwargs)  # the running forward still needs its own kwargs untouched
                h = args[0] if args else kw.pop("hidden_states")
                if i == 0:
                    hidden.append(h.detach().clone())
                calls[i] = (tuple(args[1:]), kw)
                if not record_all or i == len(blocks) - 1:
                    raise StopForward
                return h
            return on_call

        try:
            for i in range(len(blocks) if record_all else 1):
                blocks[i] = _BlockStandIn(originals[i], recorder(i))
            model(input_ids=batch, use_cache=False)
        except StopForward:
            pass
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
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
                  solve: BlockSolver, schemes: dict[str, Scheme], *, batch_size: int = 4, want_hessian: bool = True,
                  sample_tokens: int = 0, float_stats: bool = True, progress: bool = True, report: dict | None = None,
                  desc: str = "quantize", on_quantized: Callable[[str, QuantizedWeight], None] | None = None
                  ) -> dict[str, QuantizedWeight]:
    """Run `solve` block by block on calibration `tokens` (n, seqlen), each target with its scheme
    from `schemes` (full names; BlockContext.schemes has the block's, by relative name); returns {target name: weight},
    or hands each finished block's weights to on_quantized(name, weight) instead (the caller packs
    them at once, so one byte per weight of codes does not pile up over the blocks).

    float_stats: collect every group's statistics in one float forward of the block before
    `solve` (ctx.stats); a method that collects its own (true-sequential GPTQ) turns it off.
    The targets' float weights are dropped once their block is done (the caller swaps them
    for quantized modules; reading them afterwards is an error). Inside `memory.reclaiming_memory`
    their pages of a memory-mapped checkpoint are handed back to the OS as well, and large
    allocations get their own mappings (process-wide; the CLI's one-shot quantize)."""
    with reclaim_context():
        return _run_layerwise(model, facts, targets, tokens, solve, schemes, batch_size=batch_size, want_hessian=want_hessian,
                              sample_tokens=sample_tokens, float_stats=float_stats, progress=progress, report=report,
                              desc=desc, on_quantized=on_quantized)


def _run_layerwise(model, facts, targets, tokens, solve, schemes, *, batch_size, want_hessian, sample_tokens, float_stats,
                   progress, report, desc, on_quantized) -> dict[str, QuantizedWeight]:
    blocks = model.get_submodule(facts.blocks)
    started = time.perf_counter()
    hidden, calls_by_size = capture_block_inputs(model, blocks, tokens, batch_size)
    if reclaim_enabled():
        in_blocks = {id(p) for p in blocks.parameters()}
        for p in model.parameters():  # the embedding is read again only when the artifact is written
            if id(p) not in in_blocks:
                release_clean_pages(p.detach())
    release_free_memory()
    per_batch = math.ceil(sample_tokens / len(hidden)) if sample_tokens else 0
    chosen: dict[str, QuantizedWeight] = {}
    emit = on_quantized if on_quantized is not None else chosen.__setitem__
    per_block: list[dict] = []
    verdict: dict = {}  # whether the table's branches reproduce this model's blocks (checked once)
    bar = tqdm(range(len(blocks)), desc=f"{desc} (block by block)", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = blocks[i]
        prefix = f"{facts.blocks}.{i}"
        rel_targets = [n[len(prefix) + 1:] for n in targets if n.startswith(prefix + ".")]
        calls = [calls_by_size[h.shape[0]][i] for h in hidden]
        runner = BlockRunner(block, hidden, calls)
        phases = {}
        if rel_targets:
            groups, prev = input_groups(facts, rel_targets)
            loaded: set[str] = set()
            runner = make_runner(block, facts, hidden, calls, groups, loaded, verdict)
            block_schemes = {rel: schemes[f"{prefix}.{rel}"] for rel in rel_targets}
            ctx = BlockContext(i, prefix, block, groups, facts, prev, runner, block_schemes, per_batch, loaded=loaded)
            if float_stats:
                ctx.stats = ctx.collect_stats(groups, want_hessian)
            t_stats = time.perf_counter()
            solved = solve(ctx)
            ctx.load({rel: qw for rel, qw in solved.items() if rel not in ctx.loaded})
            block_chosen = {f"{prefix}.{rel}": qw for rel, qw in solved.items()}
            t_solve = time.perf_counter()
            phases = {"stats_s": round(t_stats - t0, 3), "solve_s": round(t_solve - t_stats, 3)}
            if ctx.collect_s:
                phases["sequential_stats_s"] = round(ctx.collect_s, 3)  # part of solve_s
            del ctx, solved
        t_forward = time.perf_counter()
        runner.finish()  # in place, batch by batch: block i's outputs are block i+1's inputs
        del runner
        for rel in rel_targets:  # their values are chosen: the float weights are never read again
            _release_weight(block.get_submodule(rel))
        if rel_targets:
            for name, qw in block_chosen.items():
                emit(name, qw)
            del block_chosen
        release_free_memory()
        t_end = time.perf_counter()
        if phases:
            phases["forward_s"] = round(t_end - t_forward, 3)
        per_block.append({"block": i, "seconds": round(t_end - t0, 3), **phases, "rss_bytes": rss_bytes()})
        bar.set_postfix(rss=f"{rss_bytes() / 2**20:.0f}MiB")
    report_runner = "branches" if verdict.get("reason", "unchecked") is None else "whole blocks"
    if report is not None:
        report["layerwise"] = {
            "blocks": per_block,
            "batch_size": batch_size,
            "runner": report_runner,
            "calibration_tokens": int(tokens.numel()),
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    return chosen


@torch.no_grad()
def _release_weight(module: nn.Module) -> None:
    """Drop a quantized target's float weight (the pipeline swaps the module afterwards); where the
    caller reclaims memory, pages of a memory-mapped checkpoint are handed back too, so RSS does not
    grow to the whole model."""
    if reclaim_enabled():
        release_tensor_memory(module.weight)
    module.weight = nn.Parameter(torch.empty(0, 0, dtype=module.weight.dtype), requires_grad=False)


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


@torch.no_grad()
def _load_dequantized(module: nn.Module, qw: QuantizedWeight) -> None:
    """Put the quantized values into the float module so the block's re-run sees them."""
    w = qw.dequantize()
    if is_transposed(module):
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
                                 schemes: dict[str, Scheme], batch_size: int, want_hessian: bool = True, sample_tokens: int = 0,
                                 float_stats: bool = True, progress: bool = True, report: dict | None = None,
                                 desc: str = "quantize", on_quantized: Callable | None = None
                                 ) -> dict[str, QuantizedWeight]:
    """run_layerwise over the decoder blocks; targets outside them (lm_head with --quantize-head)
    are rounded to nearest, and the report says so."""
    from ..formats.grid import quantize_weight
    from ..models.arch import arch_facts
    from ..pipeline import linear_weight

    facts = arch_facts(model.config.model_type)
    tokens = calib.tokens if hasattr(calib, "tokens") else torch.as_tensor(calib)
    in_blocks = {n: m for n, m in targets.items() if n.startswith(facts.blocks + ".")}
    chosen = run_layerwise(model, facts, in_blocks, tokens, solve, schemes, batch_size=batch_size,
                           want_hessian=want_hessian,
                           sample_tokens=sample_tokens, float_stats=float_stats, progress=progress, report=report,
                           desc=desc, on_quantized=on_quantized)
    outside = [n for n in targets if n not in in_blocks]
    for name in outside:
        chosen[name] = quantize_weight(schemes[name], linear_weight(targets[name]))
    if outside and report is not None:
        report["rtn_outside_blocks"] = outside
    return chosen
