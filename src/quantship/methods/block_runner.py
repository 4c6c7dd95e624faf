"""How a decoder block is run during layer-by-layer calibration.

`BlockRunner` (any architecture) treats the block as a black box: a group's input statistics
come from one forward per calibration batch stopped by a hook at the group's input, and the
block's outputs from a full forward once its weights are quantized. With true-sequential GPTQ
that re-runs the start of the block for every group (q/k/v + attention twice, gate/up twice)
and the whole block once more at the end.

`BranchRunner` uses the architecture table's residual branches (h = h + post(body(pre(h))),
models/arch.py) to run each part of the block once. It keeps the block's residual stream
(the hidden states, updated in place branch by branch) and, while collecting the statistics
of a branch's tail linear (o_proj, down_proj), caches the tail's input; once the tail is
quantized the branch output is tail(cached input) -- the body is not run again. A group's
statistics need only the part of the body before it (nothing for q/k/v and gate/up: their
input is the pre-norm's output), so per block every linear and the attention run once, where
the whole-block runner runs them two (float statistics + quantized re-run) to three times.

The cache holds the tail inputs of the calibration batches exactly as they are, and never
takes more memory than the hidden states: batches past that budget are not cached and their
body runs again (on SmolLM2 all of o_proj's inputs fit, 3/8 of down_proj's 2.7x wider ones do).
The cache is exact: a float16 cache would hold all of down_proj's inputs and save ~1 s per block,
but its rounding costs GPTQ quality (w3g64 gap closed 78.8% against 79.8%). A BranchRunner is used only
after checking, on the first block, that running the branches reproduces the block's own output;
otherwise the generic runner is used.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch
from torch import nn

from ..models.arch import ArchFacts, Branch

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook once the inputs it needs are captured: the rest of the forward is skipped."""


def first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _pre_hook(on_input: Callable[[torch.Tensor], None]):
    def hook(module, args):
        on_input(args[0])  # returns None: the module's inputs stay as they are
    return hook


class BlockRunner:
    """Runs a whole block over the calibration batches (`hidden`: its inputs, replaced in place
    by its outputs at `finish`; `calls`: its other arguments per batch)."""

    def __init__(self, block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]]):
        self.block, self.hidden, self.calls = block, hidden, calls

    def order(self) -> list[tuple[str, ...]] | None:
        """Groups in forward order when the runner knows it without running (None: observe)."""
        return None

    @torch.no_grad()
    def forward_with_input_hooks(self, on_input: dict[str, Callable], batches: int | None = None) -> None:
        """Run the block on every batch, calling on_input[linear name](x) with that linear's input."""
        handles = [self.block.get_submodule(name).register_forward_pre_hook(_pre_hook(f))
                   for name, f in on_input.items()]
        try:
            for h, (args, kwargs) in list(zip(self.hidden, self.calls))[:batches]:
                try:
                    self.block(h, *args, **kwargs)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def collect(self, group: tuple[str, ...], add: Callable[[torch.Tensor], None]) -> None:
        """add(x) with the group's input of every batch, from the block as it is now."""
        def add_and_stop(x):
            add(x)
            raise StopForward

        self.forward_with_input_hooks({group[0]: add_and_stop})

    @torch.no_grad()
    def finish(self) -> None:
        """Replace the block's inputs by its outputs (the next block's inputs), batch by batch."""
        for k, (args, kwargs) in enumerate(self.calls):
            self.hidden[k] = first_output(self.block(self.hidden[k], *args, **kwargs))


class BranchRunner(BlockRunner):
    """Runs the block branch by branch, each part once (module docstring). Groups must be
    collected in forward order, and a branch's groups loaded with their quantized values before
    a later branch's group is collected (true-sequential order)."""

    def __init__(self, block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]],
                 branches: tuple[Branch, ...], groups: list[tuple[str, ...]], loaded: set[str],
                 cache_bytes: int | None = None):
        super().__init__(block, hidden, calls)
        # the tail cache's budget: by default the hidden states' own size
        self.cache_bytes = cache_bytes if cache_bytes is not None else sum(h.numel() * h.element_size() for h in hidden)
        self.branches = branches
        self.loaded = loaded  # names of the linears whose quantized values are in the block
        self.branch_of = {g: _branch_index(branches, g) for g in groups}
        self._order = [g for b, branch in enumerate(branches)
                       for g in sorted((g for g in groups if self.branch_of[g] == b), key=lambda g: g[0] == branch.tail)]
        self.position = 0  # branches before this one are added into `hidden`
        self.next_group = 0  # index in _order of the next group that may be collected
        self.tail_inputs: list[torch.Tensor] | None = None  # of branch `position`, once collected
        self.kwargs = [named_block_kwargs(block, call) for call in calls]

    def order(self) -> list[tuple[str, ...]]:
        return list(self._order)

    @torch.no_grad()
    def collect(self, group: tuple[str, ...], add: Callable[[torch.Tensor], None]) -> None:
        if group not in self._order[self.next_group:]:
            raise RuntimeError(f"BranchRunner: group {group} asked for out of forward order "
                               f"({self._order}); collect each group once, in order")
        target = self.branch_of[group]
        while self.position < target:
            self._add_branch()
        self.next_group = self._order.index(group) + 1
        branch = self.branches[target]
        is_tail = group == (branch.tail,)
        tail_inputs: list[torch.Tensor | None] = []
        budget = [self.cache_bytes]

        def take(x):
            add(x)
            if is_tail:
                cached = None  # past the budget: the body runs again at the branch's end
                budget[0] -= x.numel() * x.element_size()
                if budget[0] >= 0:
                    cached = x.detach().clone()
                tail_inputs.append(cached)
            raise StopForward

        handle = self.block.get_submodule(group[0]).register_forward_pre_hook(_pre_hook(take))
        try:
            for k in range(len(self.hidden)):
                try:
                    self._body(branch, k)
                except StopForward:
                    pass
        finally:
            handle.remove()
        if is_tail:
            self.tail_inputs = tail_inputs

    @torch.no_grad()
    def finish(self) -> None:
        while self.position < len(self.branches):
            self._add_branch()

    def _body(self, branch: Branch, k: int) -> torch.Tensor:
        x = self.block.get_submodule(branch.pre_norm)(self.hidden[k])
        kwargs = self.kwargs[k] if branch.takes_block_kwargs else {}
        return first_output(self.block.get_submodule(branch.body)(x, **kwargs))

    def _add_branch(self) -> None:
        """hidden += post(branch output) for the current branch, with the block's weights as they are now."""
        b = self.position
        branch = self.branches[b]
        unloaded = [g for g in self._order if self.branch_of[g] == b and not set(g) <= self.loaded]
        if unloaded:  # the branch's output would mix float and quantized weights
            raise RuntimeError(f"BranchRunner: {unloaded} not loaded when the block moved past their branch; "
                               f"load each group's quantized values before collecting a later branch's group")
        tail = self.block.get_submodule(branch.tail)
        post = self.block.get_submodule(branch.post_norm) if branch.post_norm else None
        for k, h in enumerate(self.hidden):
            cached = self.tail_inputs[k] if self.tail_inputs is not None else None
            if cached is not None:
                out = tail(cached.to(h.dtype))
                self.tail_inputs[k] = None  # free as we go
            else:
                out = self._body(branch, k)
            h.add_(post(out) if post is not None else out)
        self.tail_inputs = None
        self.position += 1


def _branch_index(branches: tuple[Branch, ...], group: tuple[str, ...]) -> int | None:
    """The branch whose body holds every linear of `group`; None when no branch does."""
    for b, branch in enumerate(branches):
        if all(name.startswith(branch.body + ".") for name in group):
            return b
    return None


def named_block_kwargs(block: nn.Module, call: tuple[tuple, dict]) -> dict | None:
    """The block's extra arguments all by name (GPT-2's loop passes the mask positionally), so
    they can be handed on to the attention; None when they cannot be named."""
    args, kwargs = call
    if not args:
        return kwargs
    params = inspect.signature(block.forward).parameters.values()
    try:
        bound = inspect.signature(block.forward).bind(None, *args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    named.pop(next(iter(named)))  # the hidden states
    if any(p.kind == p.VAR_POSITIONAL and p.name in named for p in params):
        return None
    for p in params:
        if p.kind == p.VAR_KEYWORD and p.name in named:
            named.update(named.pop(p.name))
    return named


@torch.no_grad()
def branches_reproduce_block(block: nn.Module, branches: tuple[Branch, ...], h: torch.Tensor,
                             call: tuple[tuple, dict]) -> str | None:
    """None when running `branches` on h gives the block's own output (and each tail's output is
    its body's output); else what differs. Catches an architecture table that does not match the
    installed transformers' block."""
    kwargs = named_block_kwargs(block, call)
    if kwargs is None:
        return "the block's positional arguments cannot be named"
    try:
        expected = first_output(block(h, *call[0], **call[1]))
        r = h.clone()
        for branch in branches:
            seen = []
            tail = block.get_submodule(branch.tail)
            handle = tail.register_forward_hook(lambda m, a, out: seen.append(first_output(out)))
            try:
                x = block.get_submodule(branch.pre_norm)(r)
                out = first_output(block.get_submodule(branch.body)(x, **(kwargs if branch.takes_block_kwargs else {})))
            finally:
                handle.remove()
            if len(seen) != 1 or not torch.equal(seen[0], out):
                return f"{branch.body}'s output is not {branch.tail}'s output"
            r = r + (block.get_submodule(branch.post_norm)(out) if branch.post_norm else out)
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # a table naming modules the block lacks
        return f"{type(e).__name__}: {e}"
    scale = expected.abs().max().item() or 1.0
    if r.shape != expected.shape or not torch.allclose(r, expected, rtol=1e-5, atol=1e-6 * scale):
        return "the branches' sum differs from the block's output"
    return None


def make_runner(block: nn.Module, facts: ArchFacts, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]],
                groups: list[tuple[str, ...]], loaded: set[str], verdict: dict) -> BlockRunner:
    """A BranchRunner when the table's branches cover the block's groups and were checked to
    reproduce the block (once per run: `verdict` carries the result to later blocks), else a
    generic BlockRunner."""
    branches = facts.branches
    usable = bool(branches) and all(_branch_index(branches, g) is not None for g in groups)
    if usable and "reason" not in verdict:
        verdict["reason"] = branches_reproduce_block(block, branches, hidden[0], calls[0])
        if verdict["reason"]:
            log.warning("layer-by-layer: running blocks whole (slower): the architecture table's branches do not "
                        "reproduce the block (%s)", verdict["reason"])
    if usable and verdict["reason"] is None:
        return BranchRunner(block, hidden, calls, branches, groups, loaded)
    return BlockRunner(block, hidden, calls)
