"""How blocks run during layer-by-layer calibration: capture without running blocks, the
branch-by-branch runner against the whole-block one, released weights, the Gram split."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
import torch

from quantship.formats.scheme import parse_scheme
from quantship.memory import release_clean_pages, release_tensor_memory
from quantship.methods import gptq as gptq_module
from quantship.methods.block_runner import BlockRunner, BranchRunner, make_runner
from quantship.methods.gptq import GPTQParams
from quantship.methods.layerwise import (InputStats, _add_gram, _symmetric_from_upper, capture_block_inputs,
                                         input_groups)
from quantship.models.arch import arch_facts
from quantship.pipeline import find_targets, linear_weight
from quantship.specs import QuantSpec

from conftest import build_tiny_model

WITH_BRANCHES = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt2"]


def _tokens(n=6, seqlen=24, seed=0):
    return torch.randint(2, 250, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _block0(arch: str, batch_size: int = 2):
    model, _ = build_tiny_model(arch)
    facts = arch_facts(model.config.model_type)
    blocks = model.get_submodule(facts.blocks)
    hidden, calls_by_size = capture_block_inputs(model, blocks, _tokens(), batch_size)
    calls = [calls_by_size[h.shape[0]][0] for h in hidden]
    prefix = f"{facts.blocks}.0."
    rel = [n[len(prefix):] for n in find_targets(model, facts, QuantSpec(scheme="w4g32")) if n.startswith(prefix)]
    groups, _ = input_groups(facts, rel)
    return model, facts, blocks[0], hidden, calls, groups


@pytest.mark.parametrize("arch", WITH_BRANCHES + ["opt"])
def test_capture_runs_no_block_and_records_what_a_real_forward_passes(arch):
    model, _ = build_tiny_model(arch)
    blocks = model.get_submodule(arch_facts(model.config.model_type).blocks)
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    tokens = _tokens(n=5)  # batches of 2, 2, 1: two batch sizes
    hidden, calls_by_size = capture_block_inputs(model, blocks, tokens, batch_size=2)
    assert ran == [] and sorted(calls_by_size) == [1, 2]
    for h in handles:
        h.remove()
    assert all(a is b for a, b in zip(model.get_submodule(arch_facts(model.config.model_type).blocks), blocks))

    seen = {}  # the real forward's block arguments, for the first batch
    hooks = [b.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.setdefault(i, (args, dict(kwargs))), with_kwargs=True)
        for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=tokens[:2], use_cache=False)
    for h in hooks:
        h.remove()
    assert torch.equal(hidden[0], seen[0][0][0] if seen[0][0] else seen[0][1]["hidden_states"])
    for i in range(len(blocks)):
        args, kwargs = seen[i]
        kwargs.pop("hidden_states", None)
        assert _same(calls_by_size[2][i], (tuple(args[1:]), kwargs)), i


@pytest.mark.parametrize("arch", WITH_BRANCHES)
def test_branch_runner_gives_the_whole_block_runners_inputs_and_outputs(arch):
    model, facts, block, hidden, calls, groups = _block0(arch)
    loaded = {n for g in groups for n in g}  # float weights "loaded": both runners see the float block
    branch = make_runner(block, facts, [h.clone() for h in hidden], calls, groups, loaded, {})
    whole = BlockRunner(block, [h.clone() for h in hidden], calls)
    assert isinstance(branch, BranchRunner)
    assert [g[0].split(".")[0] for g in branch.order()] == [g[0].split(".")[0] for g in sorted(
        groups, key=lambda g: 0 if g[0].startswith(facts.branches[0].body) else 1)]
    for group in branch.order():
        got, want = [], []
        branch.collect(group, got.append)
        whole.collect(group, want.append)
        assert len(got) == len(want) == len(hidden)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max()), group
    branch.finish()
    whole.finish()
    for a, b in zip(branch.hidden, whole.hidden):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max()), arch


def test_branch_runner_without_a_collected_tail_reruns_the_body_exactly():
    model, facts, block, hidden, calls, groups = _block0("llama")
    loaded = {n for g in groups for n in g}
    branch = make_runner(block, facts, [h.clone() for h in hidden], calls, groups, loaded, {})
    branch.finish()  # nothing collected: each branch's body runs in full
    for h, out, (args, kwargs) in zip(hidden, branch.hidden, calls):
        with torch.no_grad():
            assert torch.allclose(out, block(h, *args, **kwargs), rtol=1e-6, atol=1e-6)


def test_branch_runner_enforces_forward_order_and_loading():
    model, facts, block, hidden, calls, groups = _block0("llama")
    loaded: set[str] = set()
    runner = make_runner(block, facts, hidden, calls, groups, loaded, {})
    order = runner.order()
    assert order[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert order[1] == ("self_attn.o_proj",) and order[-1] == ("mlp.down_proj",)
    runner.collect(order[1], lambda x: None)
    with pytest.raises(RuntimeError, match="out of forward order"):
        runner.collect(order[0], lambda x: None)
    loaded.update(order[0])
    with pytest.raises(RuntimeError, match="not loaded when the block moved past"):
        runner.collect(order[2], lambda x: None)  # o_proj was collected, never loaded
    loaded.add("self_attn.o_proj")
    runner.collect(order[2], lambda x: None)


def test_a_table_that_does_not_fit_the_block_falls_back_to_whole_blocks(caplog):
    model, facts, block, hidden, calls, groups = _block0("llama")
    wrong = replace(facts, branches=(replace(facts.branches[0], post_norm="post_attention_layernorm"),
                                     facts.branches[1]))
    verdict: dict = {}
    with caplog.at_level(logging.WARNING):
        runner = make_runner(block, wrong, hidden, calls, groups, set(), verdict)
    assert type(runner) is BlockRunner and "differs" in verdict["reason"]
    assert "do not reproduce the block" in caplog.text
    missing = replace(facts, branches=(replace(facts.branches[0], tail="self_attn.nope"), facts.branches[1]))
    assert type(make_runner(block, missing, hidden, calls, groups, set(), {})) is BlockRunner


def test_tail_cache_stays_within_the_hidden_states_size_and_recomputes_the_rest():
    model, facts, block, hidden, calls, groups = _block0("llama")
    loaded = {n for g in groups for n in g}
    default = make_runner(block, facts, hidden, calls, groups, loaded, {})
    assert default.cache_bytes == sum(h.numel() * h.element_size() for h in hidden)
    budget = default.cache_bytes * 3 // 4
    runner = BranchRunner(block, [h.clone() for h in hidden], calls, facts.branches, groups, loaded, budget)
    whole = BlockRunner(block, [h.clone() for h in hidden], calls)
    for group in runner.order():
        runner.collect(group, lambda x: None)
        if group in (("self_attn.o_proj",), ("mlp.down_proj",)):  # each alone would fill the budget or more
            kept = [t for t in runner.tail_inputs if t is not None]
            assert 0 < len(kept) < len(hidden)
            assert sum(t.numel() * t.element_size() for t in kept) <= budget
    runner.finish()
    whole.finish()
    for a, b in zip(runner.hidden, whole.hidden):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max())


def _run_gptq(monkeypatch, whole_blocks: bool):
    """True-sequential GPTQ on a tiny llama, recording every solve -> (model, {group name: (H, weights)}, report)."""
    from quantship.methods import layerwise

    if whole_blocks:
        monkeypatch.setattr(layerwise, "make_runner", lambda block, facts, hidden, calls, *a: BlockRunner(block, hidden, calls))
    model, _ = build_tiny_model("llama")
    facts = arch_facts(model.config.model_type)
    targets = find_targets(model, facts, QuantSpec(scheme="w3g32", method="gptq"))
    solves = {}
    real = gptq_module.quantize_group_gptq

    def recording(weights, hessian, scheme, params, names, report):
        qws = real(weights, hessian, scheme, params, names, report)
        solves[tuple(names)] = (hessian.clone(), qws)
        return qws

    monkeypatch.setattr(gptq_module, "quantize_group_gptq", recording)
    report: dict = {}
    gptq_module.run_gptq(model, targets, dict.fromkeys(targets, parse_scheme("w3g32")), GPTQParams(true_sequential=True),
                         _tokens(n=8, seqlen=32), progress=False, report=report)
    monkeypatch.undo()
    return model, targets, solves, report


def test_branch_by_branch_gptq_equals_whole_block_gptq(monkeypatch):
    _, _, by_branch, report = _run_gptq(monkeypatch, whole_blocks=False)
    _, _, by_block, report_whole = _run_gptq(monkeypatch, whole_blocks=True)
    assert report["layerwise"]["runner"] == "branches" and report_whole["layerwise"]["runner"] == "whole blocks"
    assert by_branch.keys() == by_block.keys()
    for names, (h, qws) in by_branch.items():
        h_ref, qws_ref = by_block[names]
        if ".layers.0." in names[0]:  # same inputs: exact up to summation order, same codes
            assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-6 * h_ref.abs().max()), names
            assert all(torch.equal(a.codes, b.codes) for a, b in zip(qws, qws_ref)), names
        else:  # block 1's inputs: equal up to summation order
            assert torch.allclose(h, h_ref, rtol=1e-4, atol=1e-5 * h_ref.abs().max()), names


def test_quantized_targets_float_weights_are_released(monkeypatch):
    model, targets, _, _ = _run_gptq(monkeypatch, whole_blocks=False)
    blocks = [n for n in targets if n.startswith("model.layers.")]
    assert blocks and all(model.get_submodule(n).weight.numel() == 0 for n in blocks)
    assert all(linear_weight(model.get_submodule(n)).dtype == torch.float32 for n in blocks)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssFile:\s+(\d+)", f.read()).group(1))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_release_tensor_memory_hands_back_pages_of_a_mapped_checkpoint(tmp_path):
    n = 16 * 2**20 // 4  # 16 MiB of float32
    path = tmp_path / "w.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    assert mapped.sum().item() > 0  # page it all in
    before = _rss_file_kib()
    assert release_tensor_memory(mapped)
    assert before - _rss_file_kib() > 15 * 1024  # ~16 MiB of file pages gone from RSS
    heap = torch.ones(n)
    assert not release_tensor_memory(heap) and heap.sum().item() == n  # heap memory is left alone


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/pagemap"), reason="needs Linux /proc")
def test_clean_pages_of_a_mapped_checkpoint_are_released_and_read_again(tmp_path):
    n = 16 * 2**20 // 4
    path = tmp_path / "w.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    total = mapped.double().sum().item()
    before = _rss_file_kib()
    assert release_clean_pages(mapped)
    assert before - _rss_file_kib() > 15 * 1024
    assert mapped.double().sum().item() == total  # still usable: read from the file again
    mapped[12345] = -1.0  # one written page: its private copy must not be thrown away
    assert not release_clean_pages(mapped)
    assert mapped[12345].item() == -1.0


@pytest.mark.parametrize("width", [64, 1030, 1536])
def test_split_gram_matrix_equals_the_full_product(width):
    x = torch.randn(300, width, dtype=torch.float64)
    h = torch.zeros(width, width, dtype=torch.float64)
    _add_gram(h, x[:100])
    _add_gram(h, x[100:])
    assert torch.allclose(_symmetric_from_upper(h), x.t() @ x, rtol=1e-12, atol=1e-9)
    stats = InputStats(width)
    stats.add(x.float())
    assert torch.allclose(stats.mean_hessian(), (x.t() @ x / 300).float(), rtol=1e-4, atol=1e-5)
