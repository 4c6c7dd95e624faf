"""Calibrated methods (GPTQ, AWQ, AWQ+GPTQ), the layer-by-layer pipeline and calibration data."""

from __future__ import annotations

import json

import pytest
import torch

import quantship
from quantship.artifact import read_manifest
from quantship.calib import allocate, build_calibration
from quantship.calib.overlap import find_overlap
from quantship.calib.sources import parse_source_spec
from quantship.cli import main as cli_main
from quantship.formats.grid import quantize_weight
from quantship.formats.scheme import parse_scheme
from quantship.methods.gptq import (CholeskyFailed, GPTQParams, gptq_quantize, hessian_clip_search,
                                    inverse_hessian_factor, layer_output_error, quantize_group_gptq)
from quantship.specs import QuantSpec

from conftest import build_tiny_model

QUIET = dict(progress=False, log=lambda *a, **k: None)


def correlated_inputs(n=2048, d=128, seed=0):
    """Inputs with correlated channels and a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :3] *= 8.0
    return x


@pytest.mark.parametrize("scheme", ["w4", "w4g32", "w3g64-asym", "w2g32", "nf4g32", "w8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_output_error_below_rtn(scheme, act_order):
    x = correlated_inputs()
    h = x.t() @ x / x.shape[0]
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    sc = parse_scheme(scheme)
    qw, info = gptq_quantize(w, h, sc, GPTQParams(act_order=act_order))
    e_gptq, e_rtn = layer_output_error(w, qw, h), layer_output_error(w, quantize_weight(sc, w), h)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert qw.codes.shape == w.shape and qw.scale.shape == quantize_weight(sc, w).scale.shape
    assert torch.isfinite(qw.dequantize()).all() and info["retries"] == 0


@pytest.mark.parametrize("scheme", ["w4", "w4g32", "w3g32-asym"])
def test_gptq_with_identity_hessian_is_round_to_nearest(scheme):
    # Uncorrelated unit inputs: no error is fed forward, so GPTQ must pick exactly RTN's codes.
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    sc = parse_scheme(scheme)
    qw, _ = gptq_quantize(w, torch.eye(64), sc, GPTQParams(percdamp=0.0, clip_search=False))
    ref = quantize_weight(sc, w)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scale, ref.scale)


@pytest.mark.parametrize("scheme", ["w4", "w3g32", "w4g32-asym"])
def test_hessian_clip_search_never_raises_the_weighted_rounding_error(scheme):
    x = correlated_inputs()
    h = x.t() @ x / x.shape[0]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.01] *= 12.0  # a few outlier weights: full range wastes levels
    sc = parse_scheme(scheme)
    ratio = hessian_clip_search(w, h, sc, grid=20, clip_min=0.5)
    assert ratio.shape == quantize_weight(sc, w).scale.shape and (ratio <= 1).all() and (ratio >= 0.5).all()
    assert (ratio < 1).any()
    assert layer_output_error(w, quantize_weight(sc, w, ratio), h) < layer_output_error(w, quantize_weight(sc, w), h)
    qw, _ = gptq_quantize(w, h, sc, GPTQParams(clip_search=True))
    assert torch.isfinite(qw.dequantize()).all()
    assert layer_output_error(w, qw, h) < layer_output_error(w, quantize_weight(sc, w, ratio), h)


@pytest.mark.parametrize("bad", [{"clip_grid": 1}, {"clip_min": 0.0}, {"clip_min": 1.0}])
def test_gptq_clip_params_are_validated(bad):
    with pytest.raises(ValueError, match="clip"):
        GPTQParams(**bad)


def test_gptq_act_order_keeps_the_plain_group_layout():
    x = correlated_inputs(d=64)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    sc = parse_scheme("w4g32")
    qw, _ = gptq_quantize(w, h, sc, GPTQParams(act_order=True, clip_search=False))
    # static groups: each group's scale comes from the original columns of that group
    assert torch.equal(qw.scale, quantize_weight(sc, w).scale)
    clipped, _ = gptq_quantize(w, h, sc, GPTQParams(act_order=True))  # ... as shrunk by the range search
    assert torch.equal(clipped.scale, quantize_weight(sc, w, hessian_clip_search(w, h, sc, 20, 0.5)).scale)
    # and the codes decode in place, column i of the matrix is column i of the weight
    assert (qw.dequantize() - w).abs().max() <= qw.scale.abs().max() * 8


def test_non_positive_definite_hessian_gets_more_dampening():
    upper, damp, retries = inverse_hessian_factor(-torch.eye(16), 0.01, 6)
    assert retries > 0 and damp > 1.0 and torch.isfinite(upper).all()
    w = torch.randn(8, 16)
    qw, info = gptq_quantize(w, -torch.eye(16), parse_scheme("w4"), GPTQParams())
    assert info["retries"] > 0 and torch.isfinite(qw.dequantize()).all()


def test_hessian_that_never_factors_falls_back_to_rtn_and_is_reported():
    bad = torch.full((16, 16), float("nan"))
    with pytest.raises(CholeskyFailed):
        inverse_hessian_factor(bad, 0.01, 2)
    report: dict = {}
    w = torch.randn(8, 16)
    (qw,) = quantize_group_gptq([w], bad, parse_scheme("w4"), GPTQParams(max_damp_retries=1), ["layer"], report)
    assert report["gptq_rtn_fallback"] == ["layer"]
    assert torch.equal(qw.codes, quantize_weight(parse_scheme("w4"), w).codes)


def test_stacked_linears_equal_separate_gptq():
    # q/k/v share a Hessian and are solved as one row-stacked matrix: rows are independent.
    x = correlated_inputs(d=64)
    h = x.t() @ x / x.shape[0]
    ws = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (16, 8)]
    sc = parse_scheme("w4g32")
    stacked = quantize_group_gptq(ws, h, sc, GPTQParams(), ["a", "b"], {})
    for w, qw in zip(ws, stacked):
        alone, _ = gptq_quantize(w, h, sc, GPTQParams())
        assert torch.equal(qw.codes, alone.codes) and torch.allclose(qw.scale, alone.scale)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_calibrated_methods_end_to_end(tiny_models, tmp_path, arch, method):
    src = tiny_models[arch]
    out = quantship.quantize(src, "w4g32", method=method, out=tmp_path / "q", calib_samples=8, calib_seqlen=32, **QUIET)
    manifest = quantship.verify(out)  # raises on any problem
    # awq+gptq is recorded as what it stands for: awq with quantizer gptq
    assert manifest["method"]["name"] == method.split("+")[0]
    assert manifest["method"]["params"].get("quantizer") == {"awq": "rtn", "awq+gptq": "gptq"}.get(method)
    calib = manifest["calibration"]
    assert calib["samples"] == 8 and calib["seqlen"] == 32 and len(calib["sha256"]) == 64
    model, tok = quantship.load(out)
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    rtn = quantship.quantize(src, "w4g32", method="rtn", out=tmp_path / "r", **QUIET)
    kld = quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean
    kld_rtn = quantship.evaluate(src, rtn, ctx=64, max_windows=4, **QUIET).kld.mean
    # the calibration must pay off on held-out text: a method that ignored it (RTN) sits at 1.0x;
    # measured on these models 0.24x-0.83x
    assert 0 < kld < 0.9 * kld_rtn, (kld, kld_rtn)


def test_layerwise_report_has_per_block_time_and_rss(tiny_models):
    result = quantship.quantize(tiny_models["llama"], "w4g32", method="gptq", calib_samples=4, calib_seqlen=32, **QUIET)
    lw = result.extra["layerwise"]
    assert [b["block"] for b in lw["blocks"]] == [0, 1]
    for b in lw["blocks"]:
        # a block's time is its phases' (each rounded to 1 ms; only freeing the solve's tensors lies between)
        phases = b["stats_s"] + b["solve_s"] + b["forward_s"]
        assert b["seconds"] > 0 and abs(b["seconds"] - phases) <= 0.02, b
        assert 0 < b["rss_bytes"] <= lw["peak_rss_bytes"]
    assert sum(b["seconds"] for b in lw["blocks"]) <= lw["seconds"]


def test_gptq_artifact_is_byte_identical_for_same_seed(tiny_models, tmp_path):
    kw = dict(method="gptq", calib_samples=6, calib_seqlen=32, seed=3, **QUIET)
    a = quantship.quantize(tiny_models["qwen2"], "w4g32", out=tmp_path / "a", **kw)
    b = quantship.quantize(tiny_models["qwen2"], "w4g32", out=tmp_path / "b", **kw)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert read_manifest(a)["calibration"]["sha256"] == read_manifest(b)["calibration"]["sha256"]


def test_unknown_architecture_error_names_the_table():
    model, tok = build_tiny_model("llama")
    model.config.model_type = "mystery"
    from quantship.pipeline import quantize_model

    with pytest.raises(ValueError, match="ARCHITECTURES in quantship/models/arch.py"):
        quantize_model(model, tok, QuantSpec(scheme="w4g32", method="gptq"), source=None, progress=False,
                       calib=torch.zeros(2, 16, dtype=torch.long))


def test_invalid_method_scheme_combination_is_rejected(tiny_models):
    with pytest.raises(ValueError, match=r"does not support scheme 'fp8'.*methods that take fp8: .*rtn"):
        quantship.quantize(tiny_models["llama"], "fp8", method="gptq", calib_samples=2, calib_seqlen=16, **QUIET)


# --- calibration data -------------------------------------------------------------------------

def _spec(**kw):
    return QuantSpec(scheme="w4", method="gptq", **{"calib_samples": 6, "calib_seqlen": 32, **kw})


def test_calibration_is_deterministic_and_hashed():
    model, tok = build_tiny_model("llama")
    a, b = build_calibration(_spec(), model, tok), build_calibration(_spec(), model, tok)
    assert torch.equal(a.tokens, b.tokens) and a.info["sha256"] == b.info["sha256"]
    c = build_calibration(_spec(seed=1), model, tok)
    assert c.info["sha256"] != a.info["sha256"]
    assert a.tokens.shape == (6, 32)
    assert {s["name"] for s in a.info["sources"]} == {"news", "code"}
    assert all(len(s["sha256"]) == 64 for s in a.info["sources"])


def test_calibration_mixture_weights_and_user_files(tmp_path):
    model, tok = build_tiny_model("llama")
    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hello there " * 30}]})
                                 for _ in range(3)) + "\n" + json.dumps({"prompt": "def f(x): return x " * 20}) + "\n")
    cs = build_calibration(_spec(calib=f"news:0.5,{text}:0.25,{prompts}:0.25", calib_samples=8), model, tok)
    assert [s["samples"] for s in cs.info["sources"]] == [4, 2, 2]
    assert allocate(10, [0.7, 0.3]) == [7, 3] and sum(allocate(7, [1 / 3] * 3)) == 7


@pytest.mark.parametrize("spec, message", [
    ("news:abc", "not a number"),
    ("news:0", "positive"),
    ("news,news", "twice"),
    ("news,,code", "empty item"),
    ("no/such/file.txt", "nor an existing file"),
])
def test_bad_calibration_specs_get_clear_errors(spec, message):
    model, tok = build_tiny_model("llama")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_source_spec(spec) and build_calibration(_spec(calib=spec), model, tok)


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    model, tok = build_tiny_model("llama")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_calibration(_spec(calib=str(bad)), model, tok)


def test_overlap_found_when_eval_windows_contain_calibration_text():
    model, tok = build_tiny_model("llama")
    cs = build_calibration(_spec(calib_seqlen=128, calib_samples=2), model, tok)
    inside = cs.tokens[1:2, 10:110]  # a 100-token run of a calibration window
    assert "1 of 2" in find_overlap(cs.info, torch.cat([torch.arange(100).unsqueeze(0) + 5000, inside]))
    assert find_overlap(cs.info, torch.arange(200).unsqueeze(0) + 5000) == ""


def test_eval_warns_when_candidate_was_calibrated_on_the_eval_text(tiny_models, tmp_path, capsys):
    text = tmp_path / "same.txt"
    text.write_text(" ".join(f"word{i % 5}" for i in range(3000)))  # periodic: every run recurs in every window
    out = tmp_path / "gptq"
    assert cli_main(["quantize", str(tiny_models["llama"]), "--scheme", "w4g32", "--method", "gptq", "-o", str(out),
                     "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "64"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(tiny_models["llama"]), str(out), "--text", str(text), "--ctx", "64",
                     "--max-windows", "8"]) == 0
    assert "WARNING" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_fold_input_scale_keeps_the_float_function(arch):
    from quantship.methods.fold import fold_input_scale
    from quantship.models.arch import arch_facts, is_transposed

    model, _ = build_tiny_model(arch)
    ids = torch.randint(2, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        facts = arch_facts(model.config.model_type)
        block = model.get_submodule(facts.blocks)[0]
        g = torch.Generator().manual_seed(1)
        for group in facts.groups:
            from quantship.methods.fold import out_features

            n = out_features(block.get_submodule(group.prev)) if group.prev_kind == "linear" else \
                block.get_submodule(group.prev).weight.shape[0]
            if any(block.get_submodule(lin).weight.shape[0 if is_transposed(block.get_submodule(lin)) else -1] != n
                   for lin in group.linears):
                continue  # GQA v_proj -> o_proj: not foldable
            fold_input_scale(block, group, facts, torch.rand(n, generator=g) * 3 + 0.2)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_awq_scales_gqa_v_to_o_in_v_proj_channel_space(tiny_models):
    # tiny llama: 4 heads, 2 KV heads -> o_proj's inputs are v_proj's outputs repeated twice
    from quantship.methods.awq import search_scale
    from quantship.methods.fold import expand_to_consumer

    r = quantship.quantize(tiny_models["llama"], "w4g32", method="awq", calib_samples=8, calib_seqlen=32, **QUIET)
    report = r.extra  # the method's report
    assert any(k.endswith("self_attn.o_proj") for k in report["awq_exponent"]), report.get("awq_exponent")
    assert not any("o_proj" in g for g in report.get("awq_unscaled", []))
    # the search in v_proj's space, expanded per head group, equals searching with the expanded scale
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g)
    mean_prev = torch.rand(8, generator=g) + 0.1
    expand = lambda v: expand_to_consumer(v, 2, 4)
    s, a, losses = search_scale(w, x, mean_prev, parse_scheme("w4g16"), 5, expand=expand)
    assert s.shape == (8,) and len(losses) == 5 and losses[round(a * 5)] == min(losses)


# --- true-sequential GPTQ -----------------------------------------------------------------------

ALL_TABLES = ["llama", "qwen2", "mistral", "gpt2", "opt", "phi3", "gemma3"]
FORWARD_ORDER = {  # block 0's input groups in the order its forward reaches them
    "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)],
    "gpt2": [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)],  # unfed c_proj in place
    "opt": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
            ("fc2",)],
    "phi3": [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)],
}


@pytest.mark.parametrize("arch", ALL_TABLES)
@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_true_sequential_gives_a_valid_artifact_on_every_architecture_table(tiny_models, tmp_path, arch, method):
    src = tiny_models[arch]
    key = "true_sequential" if method == "gptq" else "gptq.true_sequential"  # awq+gptq: GPTQ's own parameter
    out = quantship.quantize(src, "w4g32", method=method, method_params={key: True}, out=tmp_path / "q",
                             calib_samples=8, calib_seqlen=32, **QUIET)
    manifest = quantship.verify(out)
    params = manifest["method"]["params"]
    assert (params if method == "gptq" else params["quantizer_params"])["true_sequential"] is True
    blocks = manifest["method_report"]["layerwise"]["blocks"]
    assert all(b["sequential_stats_s"] > 0 for b in blocks)
    # every table with residual branches runs them branch by branch (OPT's MLP is no submodule)
    assert manifest["method_report"]["layerwise"]["runner"] == ("whole blocks" if arch == "opt" else "branches")
    assert not manifest["method_report"].get("gptq_rtn_fallback")
    model, tok = quantship.load(out)
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    rtn = quantship.quantize(src, "w4g32", method="rtn", out=tmp_path / "r", **QUIET)
    kld = quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean
    kld_rtn = quantship.evaluate(src, rtn, ctx=64, max_windows=4, **QUIET).kld.mean
    assert 0 < kld < 0.9 * kld_rtn, (kld, kld_rtn)  # RTN, which ignores calibration, is 1.0x; measured 0.24x-0.70x


def _record_gptq_calls(monkeypatch, module):
    """Wrap `module.quantize_group_gptq`: -> list of (names, Hessian, quantized weights) per call."""
    calls = []
    real = module.quantize_group_gptq

    def recording(weights, hessian, scheme, params, names, report):
        qws = real(weights, hessian, scheme, params, names, report)
        calls.append((names, hessian.clone(), qws))
        return qws

    monkeypatch.setattr(module, "quantize_group_gptq", recording)
    return calls


def _hessian_by_hand(model, group_input: str, tokens) -> torch.Tensor:
    """E[x x^T] of one module's input over a whole-model forward on `tokens` (one batch)."""
    xs = []
    handle = model.get_submodule(group_input).register_forward_pre_hook(lambda m, args: xs.append(args[0]))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    x = xs[0].reshape(-1, xs[0].shape[-1]).double()
    return (x.t() @ x / x.shape[0]).float()


def _gptq_block0(monkeypatch, arch: str, *, true_sequential: bool):
    """GPTQ w3g32 on a tiny model of `arch`, recording every solve -> (block 0's calls, facts, tokens)."""
    from quantship.methods import gptq as gptq_module
    from quantship.models.arch import arch_facts
    from quantship.pipeline import find_targets

    model, _ = build_tiny_model(arch)
    facts = arch_facts(model.config.model_type)
    tokens = torch.randint(2, 250, (6, 32), generator=torch.Generator().manual_seed(0))
    targets = find_targets(model, facts, QuantSpec(scheme="w3g32", method="gptq"))
    calls = _record_gptq_calls(monkeypatch, gptq_module)
    gptq_module.run_gptq(model, targets, dict.fromkeys(targets, parse_scheme("w3g32")),
                         GPTQParams(true_sequential=true_sequential), tokens, progress=False)
    return _block0_calls(calls, facts), facts, tokens


def _block0_calls(calls, facts):
    prefix = f"{facts.blocks}.0."
    return [(tuple(n[len(prefix):] for n in names), h, qws) for names, h, qws in calls if names[0].startswith(prefix)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "phi3"])
def test_true_sequential_hessian_comes_from_the_quantized_earlier_groups(monkeypatch, arch):
    # Layer-wise: in block 0 (its input, the embeddings, is the same for the float and quantized
    # model), each group's Hessian must equal E[x x^T] computed by hand from a float model whose
    # EARLIER groups of block 0 carry the quantized values, and must differ from the float one.
    from quantship.methods.layerwise import _load_dequantized

    block0, facts, tokens = _gptq_block0(monkeypatch, arch, true_sequential=True)
    assert [group for group, _, _ in block0] == FORWARD_ORDER[arch]

    reference, _ = build_tiny_model(arch)  # same seed: the float weights before quantization
    float_model, _ = build_tiny_model(arch)
    for k, (group, hessian, qws) in enumerate(block0):
        first_linear = f"{facts.blocks}.0.{group[0]}"
        by_hand = _hessian_by_hand(reference, first_linear, tokens)
        assert torch.allclose(hessian, by_hand, rtol=1e-4, atol=1e-6 * by_hand.abs().max()), group
        if k:  # a later group: its inputs moved because the earlier groups are quantized
            float_h = _hessian_by_hand(float_model, first_linear, tokens)
            assert (hessian - float_h).norm() > 1e-3 * float_h.norm(), group
        for name, qw in zip(group, qws):  # this group is quantized before the next one's Hessian
            _load_dequantized(reference.get_submodule(f"{facts.blocks}.0.{name}"), qw)


def test_without_true_sequential_every_hessian_comes_from_the_float_block(monkeypatch):
    block0, facts, tokens = _gptq_block0(monkeypatch, "llama", true_sequential=False)
    float_model, _ = build_tiny_model("llama")
    for group, hessian, _ in block0:
        by_hand = _hessian_by_hand(float_model, f"{facts.blocks}.0.{group[0]}", tokens)
        assert torch.allclose(hessian, by_hand, rtol=1e-4, atol=1e-6 * by_hand.abs().max()), group


def test_awq_gptq_true_sequential_collects_the_folded_hessian(monkeypatch):
    # The first group's inputs are the same in both modes (nothing before it is quantized): the
    # Hessian collected from the folded block must equal the float one rescaled, H / (s s^T).
    # Later groups see the quantized earlier groups, so theirs differ.
    from quantship.methods import awq as awq_module
    from quantship.methods.awq import AWQParams
    from quantship.methods.gptq import GPTQParams
    from quantship.models.arch import arch_facts
    from quantship.pipeline import assign_schemes, find_targets

    tokens = torch.randint(2, 250, (6, 32), generator=torch.Generator().manual_seed(0))
    recorded = {}
    for sequential in (True, False):
        model, _ = build_tiny_model("llama")
        facts = arch_facts(model.config.model_type)
        spec = QuantSpec(scheme="w3g32", method="awq+gptq")
        targets = find_targets(model, facts, spec)
        calls = _record_gptq_calls(monkeypatch, awq_module)
        params = AWQParams(quantizer="gptq", quantizer_params=GPTQParams(true_sequential=sequential))
        awq_module.run_awq(model, targets, assign_schemes(targets, spec), params, tokens, progress=False)
        recorded[sequential] = {group: h for group, h, _ in _block0_calls(calls, facts)}
        monkeypatch.undo()
    first, *later = FORWARD_ORDER["llama"]
    h_seq, h_float = recorded[True][first], recorded[False][first]
    assert torch.allclose(h_seq, h_float, rtol=1e-3, atol=1e-5 * h_float.abs().max())
    for group in later:
        h_seq, h_float = recorded[True][group], recorded[False][group]
        assert (h_seq - h_float).norm() > 1e-3 * h_float.norm(), group


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_true_sequential_artifact_is_byte_identical_for_same_seed(tiny_models, tmp_path, true_sequential):
    kw = dict(method="gptq", method_params={"true_sequential": true_sequential}, calib_samples=6, calib_seqlen=32,
              seed=3, **QUIET)
    a = quantship.quantize(tiny_models["llama"], "w4g32", out=tmp_path / "a", **kw)
    b = quantship.quantize(tiny_models["llama"], "w4g32", out=tmp_path / "b", **kw)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_input_stats_accumulate_every_batch_with_or_without_a_hessian():
    # abs_mean / abs_max (AWQ, SmoothQuant) must cover every batch also when no Hessian is kept
    # (they were reset at each batch when want_hessian=False).
    from quantship.methods.layerwise import InputStats

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 8, 16, generator=g) * (k + 1) for k in range(3)]
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    for want_hessian in (True, False):
        stats = InputStats(16, want_hessian)
        for b in batches:
            stats.add(b)
        assert stats.tokens == 48
        assert torch.allclose(stats.abs_mean(), x.abs().mean(0), rtol=1e-6)
        assert torch.equal(stats.abs_max, x.abs().amax(0))
