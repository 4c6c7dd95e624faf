"""HQQ, scale folding, SmoothQuant (w8a8) and the int8 x int8 kernel, on tensors and tiny models."""

from __future__ import annotations

import pytest
import torch

import quantship
from quantship.formats.grid import quantize_weight
from quantship.formats.linear import QuantLinear
from quantship.formats.scheme import parse_scheme
from quantship.methods.fold import fold_input_scale, prev_channels
from quantship.methods.hqq import HQQParams, hqq_quantize_weight, shrink_lp
from quantship.methods.registry import get_method
from quantship.models.arch import arch_facts

from conftest import build_tiny_model

QUIET = dict(progress=False, log=lambda *a, **k: None)


def llm_like_weight(out_f=192, in_f=256, seed=0):
    """Heavy-tailed weights (Student-t, 4 dof) with a few strong input columns, like LLM layers."""
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((out_f, in_f)) * 0.02
    w[:, :4] *= 3.0
    return w


def mse(w, qw):
    return (qw.dequantize() - w).pow(2).mean().item()


# --- HQQ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, max_ratio", [("w4g64-asym", 0.9), ("w3g64-asym", 0.85), ("w4g64", 0.96),
                                                 ("w3g64", 0.9), ("nf4g64", 0.97), ("w4", 0.85)])
def test_hqq_lowers_weight_error_below_rtn(scheme, max_ratio):
    w = llm_like_weight()
    sc = parse_scheme(scheme)
    e_hqq, e_rtn = mse(w, hqq_quantize_weight(w, sc, HQQParams())), mse(w, quantize_weight(sc, w))
    assert e_hqq < max_ratio * e_rtn, (e_hqq, e_rtn)


def test_hqq_result_lies_on_the_stored_grid():
    w = llm_like_weight()
    sc = parse_scheme("w4g32-asym")
    qw = hqq_quantize_weight(w, sc, HQQParams())
    assert qw.codes.dtype == torch.uint8 and qw.codes.max() <= 15 and qw.codes.shape == w.shape
    assert qw.scale.shape == (192, 8) and qw.offset.shape == (192, 8)
    # fp16-exact parameters and nearest codes under them: packing into QuantLinear loses nothing
    assert torch.equal(qw.scale, qw.scale.half().float()) and torch.equal(qw.offset, qw.offset.half().float())
    layer = QuantLinear.from_quantized(qw, None)
    assert torch.equal(layer.dequantize(), qw.dequantize())


def test_hqq_zero_only_mode_keeps_the_rtn_scale():
    w = llm_like_weight()
    sc = parse_scheme("w4g64-asym")
    qw = hqq_quantize_weight(w, sc, HQQParams(optimize_scale=False))
    assert torch.equal(qw.scale, quantize_weight(sc, w).scale)
    assert mse(w, qw) < mse(w, quantize_weight(sc, w))


def test_hqq_warns_once_on_a_symmetric_integer_grid(caplog, monkeypatch):
    import quantship.methods.hqq as hqq

    monkeypatch.setattr(hqq, "_warned_symmetric", set())
    w = llm_like_weight()
    with caplog.at_level("WARNING", logger="quantship.methods.hqq"):
        for name in ("w4g64-asym", "nf4g64", "w4g64", "w4g64"):
            hqq_quantize_weight(w, parse_scheme(name), HQQParams(iterations=2))
    warnings = [r.getMessage() for r in caplog.records if r.name == "quantship.methods.hqq"]
    assert len(warnings) == 1 and "w4g64" in warnings[0] and "w4g64-asym" in warnings[0]


def test_shrink_lp_zeroes_small_errors_and_keeps_large_ones():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert y[1] == 0 and y[2] == 0 and y[3] == 0
    assert 1.9 < y[4] < 2.0 and y[0] == -y[4]


@pytest.mark.parametrize("bad", [dict(lp_norm=1.0), dict(lp_norm=0.0), dict(iterations=0), dict(kappa=0.9),
                                 dict(beta=0.0)])
def test_hqq_params_are_validated(bad):
    with pytest.raises(ValueError):
        HQQParams(**bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_hqq_quantize_save_verify_load(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    out = quantship.quantize(src, "w4g32-asym", method="hqq", out=tmp_path / "q",
                             method_params={"iterations": 10}, **QUIET)
    manifest = quantship.verify(out)
    assert manifest["method"]["name"] == "hqq"
    assert manifest["method"]["params"]["iterations"] == 10 and manifest["method"]["params"]["lp_norm"] == 0.7
    model, tok = quantship.load(out)
    mem = quantship.quantize(src, "w4g32-asym", method="hqq", method_params={"iterations": 10}, **QUIET).model
    ids = torch.randint(2, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mem(ids).logits)
    rtn = quantship.quantize(src, "w4g32-asym", method="rtn", out=tmp_path / "r", **QUIET)
    kld = quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean
    kld_rtn = quantship.evaluate(src, rtn, ctx=64, max_windows=4, **QUIET).kld.mean
    assert 0 <= kld < 1.5 * kld_rtn + 1e-6, (kld, kld_rtn)


# --- valid combinations -----------------------------------------------------------------------

@pytest.mark.parametrize("method, scheme, valid", [
    ("hqq", "w4g64", True), ("hqq", "w3g32-asym", True), ("hqq", "nf4g64", True), ("hqq", "w8pt", True),
    ("hqq", "fp8", False), ("hqq", "w8a8", False),
    ("smoothquant", "w8a8", True), ("smoothquant", "w8", False), ("smoothquant", "w4g64", False),
    ("rtn", "w8a8", True), ("rtn", "fp8", True), ("rtn", "nf4g64", True),
])
def test_method_scheme_matrix(method, scheme, valid):
    m, sc = get_method(method), parse_scheme(scheme)
    assert m.supports(sc) == valid
    if not valid:
        with pytest.raises(ValueError, match=rf"does not support scheme '{scheme}'.*takes.*methods that take"):
            m.check_scheme(sc)


def test_invalid_combinations_are_rejected_end_to_end(tiny_models):
    with pytest.raises(ValueError, match="does not support scheme"):
        quantship.quantize(tiny_models["llama"], "fp8", method="hqq", **QUIET)
    with pytest.raises(ValueError, match="does not support scheme"):
        quantship.quantize(tiny_models["llama"], "w4g32", method="smoothquant", calib_samples=2, calib_seqlen=16,
                           **QUIET)


# --- fold_input_scale -------------------------------------------------------------------------

def build_tiny_gemma3(seed=0):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=16, eos_token_id=0, pad_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random-init Gemma norms are 0 (= scale 1): make them non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2", "gemma3"])
def test_fold_input_scale_keeps_the_float_function_on_every_group(arch):
    model = build_tiny_gemma3() if arch == "gemma3" else build_tiny_model(arch)[0]
    facts = arch_facts(model.config.model_type)
    ids = torch.randint(2, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = model(ids).logits
        weights_before = {k: v.clone() for k, v in model.state_dict().items()}
        for block in model.get_submodule(facts.blocks):
            for group in facts.groups:  # includes GQA v_proj -> o_proj (4 heads, 2 KV heads)
                n = prev_channels(block, group)
                fold_input_scale(block, group, facts, torch.exp(torch.randn(n, generator=g)))
        after = model(ids).logits
    changed = sum(not torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert changed >= 4 * len(model.get_submodule(facts.blocks))
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()


def test_fold_rejects_bad_scales():
    model, _ = build_tiny_model("llama")
    facts = arch_facts("llama")
    block = model.get_submodule(facts.blocks)[0]
    with pytest.raises(ValueError, match="finite and positive"):
        fold_input_scale(block, facts.groups[0], facts, -torch.ones(64))
    with pytest.raises(ValueError, match="output channels"):
        fold_input_scale(block, facts.groups[1], facts, torch.ones(64))  # v_proj has 32 outputs (2 KV heads)


# --- SmoothQuant ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_smoothquant_end_to_end(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    out = quantship.quantize(src, "w8a8", method="smoothquant", out=tmp_path / "sq", calib_samples=8,
                             calib_seqlen=32, **QUIET)
    manifest = quantship.verify(out)
    assert manifest["method"]["name"] == "smoothquant" and manifest["method"]["params"]["alpha"] == 0.5
    model, tok = quantship.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.name == "w8a8" and m.act_scale is None for m in layers)
    naive = quantship.quantize(src, "w8a8", method="rtn", out=tmp_path / "naive", **QUIET)
    kld = quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean
    kld_naive = quantship.evaluate(src, naive, ctx=64, max_windows=4, **QUIET).kld.mean
    # smoothing must pay off on held-out text: naive W8A8 (no calibration) is 1.0x; measured 0.46x-0.82x
    assert 0 < kld < 0.9 * kld_naive and kld_naive < 0.05, (kld, kld_naive)


def test_smoothquant_reports_statistics_and_smooths_outliers(tiny_models):
    result = quantship.quantize(tiny_models["llama"], "w8a8", method="smoothquant", calib_samples=8,
                                calib_seqlen=32, **QUIET)
    sq = result.extra["smoothquant"]
    assert sq["summary"]["smoothed_groups"] == 8  # 2 blocks x (qkv, o, gate/up, down)
    for g in sq["groups"].values():
        assert g["act_outlier_ratio_smoothed"] <= g["act_outlier_ratio"] + 1e-6
    only_norm = quantship.quantize(tiny_models["llama"], "w8a8", method="smoothquant", calib_samples=8,
                                   calib_seqlen=32, method_params={"groups": "norm"}, **QUIET)
    assert only_norm.extra["smoothquant"]["summary"]["smoothed_groups"] == 4


def test_smoothquant_weight_only_override_makes_a_mixed_precision_artifact(tiny_models, tmp_path):
    src = tiny_models["llama"]
    out = quantship.quantize(src, "w8a8", method="smoothquant", calib_samples=8, calib_seqlen=32,
                             overrides={"down_proj": "w8"}, out=tmp_path / "mixed", **QUIET)
    manifest = quantship.verify(out)
    schemes = {name: info["scheme"] for name, info in manifest["modules"].items()}
    assert {s for n, s in schemes.items() if n.endswith("down_proj")} == {"w8"}
    assert {s for n, s in schemes.items() if not n.endswith("down_proj")} == {"w8a8"}
    sq = manifest["method_report"]["smoothquant"]
    assert sq["summary"]["weight_only_linears"] == 2 and sq["summary"]["smoothed_groups"] == 6  # no up -> down
    assert manifest["overrides"] == [["down_proj", "w8"]]
    model, _ = quantship.load(out)
    by_name = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    down = by_name["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, down.in_features)
    assert torch.equal(down.fake_quantize_input(x), x)  # float activations
    q = by_name["model.layers.0.self_attn.q_proj"]
    y = torch.randn(3, q.in_features)
    assert not torch.equal(q.fake_quantize_input(y), y)  # int8 activations


def test_smoothquant_override_typo_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match=r"--override dwn_proj=w8 matches no layer.*down_proj"):
        quantship.quantize(tiny_models["llama"], "w8a8", method="smoothquant", calib_samples=4, calib_seqlen=16,
                           overrides={"dwn_proj": "w8"}, **QUIET)


def test_smoothquant_weight_only_parameter_points_to_the_override(tiny_models):
    with pytest.raises(ValueError, match=r"no parameter 'weight_only'.*--override 'down_proj=w8'"):
        quantship.quantize(tiny_models["llama"], "w8a8", method="smoothquant", calib_samples=4, calib_seqlen=16,
                           method_params={"weight_only": "down_proj"}, **QUIET)


def test_smoothquant_static_activation_scales_round_trip(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    result = quantship.quantize(src, "w8a8", method="smoothquant", calib_samples=8, calib_seqlen=32,
                                method_params={"static_act": True}, **QUIET)
    ids = torch.randint(2, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mem_logits = result.model(ids).logits
    out = quantship.quantize(src, "w8a8", method="smoothquant", calib_samples=8, calib_seqlen=32,
                             method_params={"static_act": True}, out=tmp_path / "static", **QUIET)
    quantship.verify(out)
    model, _ = quantship.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_scale is not None and m.act_scale.item() > 0 for m in layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mem_logits)
    kld = quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean
    assert 0 <= kld < 0.1


# --- QuantLinear act_scale + the int8 x int8 kernel -------------------------------------------

def test_act_scale_buffer_round_trips_through_state_dict():
    w = torch.randn(48, 64) * 0.05
    a = QuantLinear.from_quantized(quantize_weight(parse_scheme("w8a8"), w), torch.randn(48))
    a.set_act_scale(0.03)
    fresh = QuantLinear(64, 48, "w8a8", bias=True)
    assert fresh.act_scale is None
    fresh.load_state_dict(a.state_dict())
    assert fresh.act_scale.item() == pytest.approx(0.03)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), a(x))
    with pytest.raises(ValueError, match="needs w8a8"):
        QuantLinear.from_quantized(quantize_weight(parse_scheme("w8"), w), None).set_act_scale(0.1)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (5, 576), (2, 33, 576), (512, 576)])
def test_w8a8_int8_kernel_equals_reference(static, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 576, generator=g) * 0.05
    layer = QuantLinear.from_quantized(quantize_weight(parse_scheme("w8a8"), w), torch.randn(192, generator=g))
    if static:
        layer.set_act_scale(0.04)
    x = torch.randn(*shape, generator=g)
    x[..., 7] *= 40.0  # an outlier channel
    ref = layer.reference_forward(x)
    assert layer.prepare_fast() == "w8a8_int8_int_mm"
    layer.kernel_state["max_rows"] = 1 << 30  # force the int8 path for every size (normally M <= 2 only)
    y = layer(x)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), (y - ref).abs().max()
    from quantship.formats.kernels import _w8a8_int

    assert torch.allclose(_w8a8_int(layer, x), ref, atol=1e-5, rtol=1e-5)
    layer.kernel_state["max_rows"] = 2
    assert (_w8a8_int(layer, x) is None) == (x.reshape(-1, 576).shape[0] > 2)
