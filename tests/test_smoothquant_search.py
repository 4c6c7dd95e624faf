"""SmoothQuant's per-group alpha search, output-error clipping and GPTQ rounding (w8a8)."""

from __future__ import annotations

import pytest
import torch

import quantship
from quantship.formats.grid import quantize_weight
from quantship.formats.linear import QuantLinear
from quantship.formats.scheme import parse_scheme
from quantship.methods.registry import get_method
from quantship.methods.smoothquant import (SmoothQuantParams, fake_quant_w8a8, output_clip_ratio, search_alpha,
                                           smoothing_scale)

QUIET = dict(progress=False, log=lambda *a, **k: None)
W8A8 = parse_scheme("w8a8")


def outlier_inputs(tokens=256, in_f=128, out_f=96, seed=0):
    """Activations with a few huge channels (as LLM norm outputs) and flat weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, :3] *= 40.0
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return x, w


def output_error(x, w, s, static_max=None):
    return (fake_quant_w8a8(W8A8, x / s, w * s, static_max) - x @ w.t()).pow(2).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("static_act", [False, True])
def test_searched_alpha_never_has_a_larger_output_error_than_the_fixed_one(seed, static_act):
    x, w = outlier_inputs(seed=seed)
    params = SmoothQuantParams(alpha_search=True, static_act=static_act)
    act_max, w_max = x.abs().amax(0), w.abs().amax(0)
    alpha, s, errors = search_alpha(x, w, act_max, w_max, W8A8, params)
    assert alpha in params.alpha_grid() and set(errors) == set(params.alpha_grid())
    assert torch.allclose(s, smoothing_scale(act_max, w_max, alpha, params.min_value))
    assert errors[alpha] == min(errors.values()) <= errors[0.5]
    static_max = (act_max / s).max().item() if static_act else None
    assert output_error(x, w, s, static_max) == pytest.approx(errors[alpha], rel=1e-5)
    # and smoothing at all beats none on these outliers
    assert errors[alpha] < output_error(x, w, torch.ones(x.shape[1]), x.abs().max().item() if static_act else None)


def test_defaults_are_the_configuration_that_meets_the_w8a8_target():
    p = SmoothQuantParams()
    assert p.alpha_search and p.quantizer == "gptq" and p.alpha == 0.5 and not p.clip
    assert p.quantizer_params.percdamp == 0.1 and not p.quantizer_params.true_sequential


def test_alpha_grid_and_parameter_validation():
    assert SmoothQuantParams().alpha_grid() == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert SmoothQuantParams(alpha=0.42, alpha_min=0.4, alpha_max=0.6, alpha_step=0.1).alpha_grid() == [0.4, 0.42, 0.5, 0.6]
    assert SmoothQuantParams(alpha_min=0.7, alpha_max=0.7).alpha_grid() == [0.5, 0.7]
    for bad, match in (({"alpha_min": 0.8, "alpha_max": 0.6}, "alpha_min <= alpha_max"),
                       ({"alpha_max": 1.2}, "alpha_max"), ({"alpha_step": 0.0}, "alpha_step"),
                       ({"sample_tokens": 0}, "sample_tokens"), ({"quantizer": "awq"}, "rtn, gptq")):
        with pytest.raises(ValueError, match=match):
            SmoothQuantParams(**bad)
    m = get_method("smoothquant")
    for bad, match in (({"gptq.percdamp": -1.0}, "percdamp"), ({"gptq.true_sequential": True}, "true_sequential"),
                       ({"quantizer": "rtn", "gptq.percdamp": 0.1}, "quantizer=gptq"),
                       ({"weight_method": "rtn"}, "quantizer=rtn"), ({"percdamp": 0.1}, "gptq.percdamp"),
                       ({"quantizer": "rtn", "clip": True, "rtn.clip_search": True}, "keep one")):
        with pytest.raises(ValueError, match=match):
            m.make_params(bad)


def test_output_clip_ratio_never_raises_the_output_error():
    x, w = outlier_inputs(seed=3)
    w[:, 5] *= 30.0  # a weight outlier column: clipping it costs less than rounding every other column coarsely
    clip = output_clip_ratio(w, x, W8A8)
    assert clip.shape == (w.shape[0], 1) and (clip <= 1).all() and (clip >= 0.5).all()

    def err(qw):
        return (x @ (w - qw.dequantize()).t()).pow(2).sum(0)  # per row

    assert (err(quantize_weight(W8A8, w, clip)) <= err(quantize_weight(W8A8, w)) + 1e-6).all()


def test_alpha_search_end_to_end_records_choices_in_the_manifest(tiny_models, tmp_path):
    src = tiny_models["llama"]
    out = quantship.quantize(src, "w8a8", method="smoothquant", calib_samples=8, calib_seqlen=32,
                             method_params={"alpha_step": 0.1, "sample_tokens": 128, "quantizer": "rtn"},
                             out=tmp_path / "search", **QUIET)
    manifest = quantship.verify(out)
    params = manifest["method"]["params"]
    assert params["alpha_search"] is True and params["alpha"] == 0.5 and params["alpha_step"] == 0.1
    sq = manifest["method_report"]["smoothquant"]
    grid = SmoothQuantParams(alpha_step=0.1).alpha_grid()
    assert len(sq["groups"]) == 8  # 2 blocks x (qkv, o, gate/up, down)
    for g in sq["groups"].values():
        assert g["alpha"] in grid and g["error"] <= g["error_alpha_0.5"]
    by_group = sq["summary"]["alpha_by_group"]
    assert set(by_group) == {"self_attn.q_proj,self_attn.k_proj,self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj,mlp.up_proj", "mlp.down_proj"}
    assert all(len(v) == 2 for v in by_group.values())
    model, _ = quantship.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scheme.name == "w8a8" for m in layers)
    assert quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean < 0.05


@pytest.mark.parametrize("extra", [{"quantizer": "gptq"}, {"quantizer": "rtn", "clip": True},
                                   {"alpha_search": False, "quantizer": "rtn"}])
def test_smoothquant_weight_rounding_options_stay_pure_w8a8(tiny_models, tmp_path, extra):
    src = tiny_models["qwen2"]
    out = quantship.quantize(src, "w8a8", method="smoothquant", calib_samples=4, calib_seqlen=32,
                             method_params={"sample_tokens": 64, **extra},
                             out=tmp_path / "sq", **QUIET)
    manifest = quantship.verify(out)
    assert all(manifest["method"]["params"][k] == v for k, v in extra.items())
    assert {info["scheme"] for info in manifest["modules"].values()} == {"w8a8"}
    assert quantship.evaluate(src, out, ctx=64, max_windows=4, **QUIET).kld.mean < 0.05
