"""Per-layer schemes (QuantSpec.overrides) end to end, and transforms composed with a weight
quantizer chosen by name (awq / smoothquant with quantizer=rtn|gptq)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from rich.console import Console

import quantship
from quantship.cli import main as cli
from quantship.engine import Engine, SamplingParams
from quantship.formats.linear import QuantLinear
from quantship.formats.scheme import parse_scheme
from quantship.methods.gptq import GPTQParams, quantize_group_gptq
from quantship.methods.registry import get_method
from quantship.models.arch import arch_facts
from quantship.pipeline import assign_schemes, find_targets, plan_schemes, quantize_model
from quantship.report import quant_table
from quantship.specs import QuantSpec, parse_overrides

from conftest import build_tiny_model

QUIET = dict(progress=False, log=lambda *a, **k: None)
CALIB = dict(calib_samples=4, calib_seqlen=32)


def tiny_targets(arch="llama", **spec):
    model, _ = build_tiny_model(arch)
    spec = QuantSpec(**{"scheme": "w4g32", **spec})
    return model, spec, find_targets(model, arch_facts(model.config.model_type), spec)


# --- the spec: parsing, precedence, errors -----------------------------------------------------

def test_override_strings_parse_in_order_and_bad_ones_are_named():
    assert parse_overrides(["down_proj=w8", r"layers\.0\.=w3g32", "a=b=w4g32"]) == (
        ("down_proj", "w8"), (r"layers\.0\.", "w3g32"), ("a=b", "w4g32"))
    for bad in ("down_proj", "=w8", "down_proj="):
        with pytest.raises(ValueError, match="REGEX=SCHEME"):
            parse_overrides([bad])
    with pytest.raises(ValueError, match=r"--override \(=w8.*valid regular expression"):
        QuantSpec(scheme="w4g32", overrides=(("(", "w8"),))
    with pytest.raises(ValueError, match=r"--override down_proj=w9x.*unknown scheme"):
        QuantSpec(scheme="w4g32", overrides=(("down_proj", "w9x"),))


def test_the_last_matching_override_wins():
    spec = QuantSpec(scheme="w4g32", overrides=(("proj", "w8"), (r"layers\.0\.", "w3g32"), ("down_proj", "w4")))
    assert spec.scheme_for("model.layers.0.self_attn.q_proj").name == "w3g32"
    assert spec.scheme_for("model.layers.1.self_attn.q_proj").name == "w8"
    assert spec.scheme_for("model.layers.0.mlp.down_proj").name == "w4"
    assert spec.scheme_for("lm_head").name == "w4g32"  # no override: the default
    flipped = QuantSpec(scheme="w4g32", overrides=((r"layers\.0\.", "w3g32"), ("proj", "w8")))
    assert flipped.scheme_for("model.layers.0.self_attn.q_proj").name == "w8"
    model, spec, targets = tiny_targets(overrides=spec.overrides)
    schemes = assign_schemes(targets, spec)
    assert schemes == {name: spec.scheme_for(name) for name in targets}
    assert {s.name for s in schemes.values()} == {"w3g32", "w8", "w4"}


def test_an_override_matching_no_layer_is_an_error_naming_it():
    _, spec, targets = tiny_targets(overrides=(("down_proj", "w8"), ("dwn_proj", "w8")))
    with pytest.raises(ValueError, match=r"--override dwn_proj=w8 matches no layer.*model\.layers\.0\.self_attn"):
        assign_schemes(targets, spec)
    # a layer kept in float by --ignore is no target either
    _, spec, targets = tiny_targets(ignore=("down_proj",), overrides=(("down_proj", "w8"),))
    with pytest.raises(ValueError, match="down_proj=w8 matches no layer"):
        assign_schemes(targets, spec)


def test_a_group_that_does_not_divide_a_layer_is_an_error_naming_the_layer_and_override():
    model, _ = build_tiny_model("llama")  # hidden 64, intermediate 128: g48 divides neither
    spec = QuantSpec(scheme="w4g32", overrides=(("down_proj", "w4g48"),))
    with pytest.raises(ValueError, match=r"w4g48 \(from --override down_proj=w4g48\): group size 48 does not divide "
                                         r"in_features=128 of layer model\.layers\.0\.mlp\.down_proj"):
        plan_schemes(model, spec)


def test_method_and_scheme_are_checked_per_override_before_calibration(tiny_models, monkeypatch):
    import quantship.api as api

    def no_calibration(*a, **k):
        raise AssertionError("calibration data was built before the spec was validated")

    monkeypatch.setattr(api, "_calibration", no_calibration)
    with pytest.raises(ValueError, match=r"'awq'.*quantizer 'gptq' does not support scheme 'fp8' \(from --override "
                                         r"down_proj=fp8\)"):
        quantship.quantize(tiny_models["llama"], "w4g32", method="awq+gptq", overrides={"down_proj": "fp8"}, **QUIET)
    with pytest.raises(ValueError, match=r"'hqq' does not support scheme 'fp8' \(from --override o_proj=fp8\)"):
        quantship.quantize(tiny_models["llama"], "w4g32", method="hqq", overrides=["o_proj=fp8"], **QUIET)
    with pytest.raises(ValueError, match="matches no layer"):
        quantship.quantize(tiny_models["llama"], "w4g32", method="gptq", overrides={"nothing": "w8"}, **QUIET)


# --- every method honours each layer's scheme; the manifest round-trips ------------------------

MIXED = {"down_proj": "w8", r"layers\.0\.self_attn\.k_proj": "w3g32-asym"}


@pytest.mark.parametrize("method, extra", [("rtn", {}), ("hqq", {}), ("gptq", {}), ("gptq", {"true_sequential": False}),
                                           ("awq", {}), ("awq+gptq", {}), ("awq", {"quantizer": "gptq",
                                                                                 "gptq.true_sequential": False})])
def test_every_method_quantizes_each_layer_on_its_own_scheme(tiny_models, tmp_path, method, extra):
    out = quantship.quantize(tiny_models["llama"], "w4g32", method=method, method_params=extra, overrides=MIXED,
                             out=tmp_path / "a", **CALIB, **QUIET)
    manifest = quantship.verify(out)
    spec = QuantSpec(scheme="w4g32", overrides=tuple(MIXED.items()))
    assert manifest["scheme"] == "w4g32" and manifest["overrides"] == [list(p) for p in MIXED.items()]
    got = {name: info["scheme"] for name, info in manifest["modules"].items()}
    assert got == {name: spec.scheme_for(name).name for name in got}
    assert set(got.values()) == {"w4g32", "w8", "w3g32-asym"}
    model, _ = quantship.load(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.scheme.name for n, m in layers.items()} == got
    for name, info in manifest["modules"].items():  # bpw recorded from the layer's own scheme
        assert info["bits_per_weight"] == round(parse_scheme(info["scheme"]).bits_per_weight(*info["shape"]), 4)
    assert quantship.evaluate(tiny_models["llama"], out, ctx=64, max_windows=2, **QUIET)["kld"]["mean"] < 0.5


def test_smoothquant_with_weight_only_overrides_and_either_quantizer(tiny_models):
    for quantizer in ("gptq", "rtn"):
        r = quantship.quantize(tiny_models["qwen2"], "w8a8", method="smoothquant",
                               method_params={"quantizer": quantizer, "sample_tokens": 64},
                               overrides={"down_proj": "w8", r"layers\.1\.self_attn\.o_proj": "w4g32"}, **CALIB, **QUIET)
        got = {n: info["scheme"] for n, info in r.modules.items()}
        assert {s for n, s in got.items() if n.endswith("down_proj")} == {"w8"}
        assert got["model.layers.1.self_attn.o_proj"] == "w4g32" and got["model.layers.0.self_attn.o_proj"] == "w8a8"
        sq = r.extra["smoothquant"]
        assert sorted(sq["weight_only"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                             "model.layers.1.self_attn.o_proj"]
        assert "model.layers.1:self_attn.o_proj" in sq["unsmoothed"]  # weight-only: not smoothed
        assert r.method_params["quantizer"] == quantizer


def test_gptq_stacks_only_rows_of_one_scheme():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + torch.randn(64, 64, generator=g) / 8)
    h = x.t() @ x / x.shape[0]
    a, b, c = (torch.randn(n, 64, generator=g) * 0.05 for n in (32, 16, 16))
    w4, w8 = parse_scheme("w4g32"), parse_scheme("w8")
    mixed = quantize_group_gptq([a, b, c], h, [w4, w8, w4], GPTQParams(), ["a", "b", "c"], {})
    stacked = quantize_group_gptq([a, c], h, w4, GPTQParams(), ["a", "c"], {})
    (alone,) = quantize_group_gptq([b], h, w8, GPTQParams(), ["b"], {})
    assert [q.scheme for q in mixed] == [w4, w8, w4]
    for got, want in zip(mixed, [stacked[0], alone, stacked[1]]):
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)


# --- the summary table, the CLI, the engine ----------------------------------------------------

def _render(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_cli_override_writes_both_schemes_to_manifest_and_table(tiny_models, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w4g32", "--override", "down_proj=w8",
                "--override", r"layers\.0\.mlp\.down_proj=w4g64", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    manifest = quantship.verify(out)
    assert manifest["overrides"] == [["down_proj", "w8"], [r"layers\.0\.mlp\.down_proj", "w4g64"]]
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["scheme"] == "w4g64"
    assert manifest["modules"]["model.layers.1.mlp.down_proj"]["scheme"] == "w8"
    table = _render(quant_table(manifest, "x"))
    rows = {tuple(c.strip() for c in line.split("│")[1:3]) for line in table.splitlines() if "│" in line}
    assert {("down_proj x1", "w4g64"), ("down_proj x1", "w8"), ("q_proj x2", "w4g32")} <= rows
    assert "down_proj=w8" in table and "down_proj x1" in text
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w4g32", "--override", "down_proj", "-o",
                str(tmp_path / "bad")]) == 1
    assert "REGEX=SCHEME" in capsys.readouterr().err


def _layer_kinds(engine, i):
    """The native op's (kind, group) per projection of layer i, from its spec list."""
    _, _, spec = engine.forward.native.layers[i]
    kinds, k = [], 0
    while k < len(spec):
        n = spec[k]
        kinds += [(spec[k + 1 + 2 * j], spec[k + 2 + 2 * j]) for j in range(n)]
        k += 1 + 2 * n
    return kinds


@pytest.mark.parametrize("overrides, fused_qkv", [({"down_proj": "w8"}, True),
                                                 ({"down_proj": "w8", "k_proj": "w8"}, False)])
def test_engine_uses_each_layers_own_kernel(tiny_models, overrides, fused_qkv):
    from quantship import native
    from quantship.engine.native_decode import LinearKind

    r = quantship.quantize(str(tiny_models["llama"]), "w4g32", overrides=overrides, **QUIET)
    ids = torch.tensor(r.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"])
    ref_engine = Engine(r.model, r.tokenizer, fast=False)
    exact = ref_engine.forward.prefill(ids, ref_engine.cache, 0)
    engine = Engine(r.model, r.tokenizer, fast=True)
    int8 = "int8_native" if native.available() else "int8_weight_only"
    int4 = ("int4_native", "int4_group")
    for i, layer in enumerate(r.model.model.layers):
        assert layer.mlp.down_proj.kernel_name == int8
        assert layer.self_attn.o_proj.kernel_name in int4
        qkv = engine.forward.qkv[i]
        assert (qkv is not None) == fused_qkv  # q/k/v of different schemes do not fuse
        if fused_qkv:
            assert qkv.kernel_name in int4
        else:
            assert layer.self_attn.k_proj.kernel_name == int8 and layer.self_attn.q_proj.kernel_name in int4
    assert engine.kernels[int8] == len(r.model.model.layers) * (1 + (not fused_qkv))
    fast = engine.forward.prefill(ids, engine.cache, 0)
    lp_e, lp_f = torch.log_softmax(exact, -1), torch.log_softmax(fast, -1)
    assert float((lp_e.exp() * (lp_e - lp_f)).sum()) < 1e-2
    if not native.available():
        assert engine.decode_path == "python"
        return
    assert engine.decode_path == "native"
    int8_kind, int4_kind = (int(LinearKind.INT8), 0), (int(LinearKind.INT4), 32)
    qkv_kinds = [int4_kind] if fused_qkv else [int4_kind, int8_kind, int4_kind]
    assert _layer_kinds(engine, 0) == [*qkv_kinds, int4_kind, int4_kind, int8_kind]
    # the native decode of a mixed layer computes what the Python decode computes
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    native_out = engine.generate(["The quick brown fox"], greedy)
    engine.forward.native = None  # the same prepared kernels, the Python layer loop
    assert native_out == engine.generate(["The quick brown fox"], greedy)


# --- transforms take a weight quantizer by name ------------------------------------------------

def test_transform_params_take_the_quantizer_by_name():
    awq = get_method("awq")
    p = awq.make_params({"quantizer": "gptq", "gptq.percdamp": 0.05, "gptq.act_order": False, "grid": 10})
    assert p.quantizer == "gptq" and p.grid == 10
    assert p.quantizer_params == GPTQParams(percdamp=0.05, act_order=False)
    assert awq.make_params({}).quantizer == "rtn"
    sq = get_method("smoothquant").make_params({"gptq.act_order": False})
    assert sq.quantizer_params == GPTQParams(percdamp=0.1, true_sequential=False, act_order=False)
    for bad, match in (({"gptq.percdamp": 0.1}, r"for quantizer 'gptq', but the quantizer is 'rtn'.*quantizer=gptq"),
                       ({"quantizer": "gptq", "gptq.nope": 1}, r"quantizer 'gptq'.*no parameter\(s\) nope"),
                       ({"quantizer": "hqq"}, "takes quantizer rtn or gptq"),
                       ({"percdamp": 0.1}, r"no parameter 'percdamp' any more.*gptq\.percdamp"),
                       ({"true_sequential": False}, r"gptq\.true_sequential"),
                       ({"rtn.clip_search": True}, "keep one")):
        with pytest.raises(ValueError, match=match):
            awq.make_params(bad)
    with pytest.raises(ValueError, match="takes no quantizer"):
        get_method("gptq").make_params({"rtn.clip_search": True})


def test_one_name_per_method():
    spec = QuantSpec(scheme="w4g32", method="awq+gptq", method_params=(("gptq.percdamp", 0.05),))
    assert spec.method == "awq" and spec.params == {"quantizer": "gptq", "gptq.percdamp": 0.05}
    with pytest.raises(ValueError, match=r"'awq\+gptq' is 'awq' with quantizer=gptq; it cannot take quantizer=rtn"):
        QuantSpec(scheme="w4g32", method="awq+gptq", method_params=(("quantizer", "rtn"),))
    with pytest.raises(ValueError, match=r"unknown method 'awq\+rtn' \(use 'awq'"):
        get_method("awq+rtn")


def test_cli_act_order_flag_reaches_the_transforms_quantizer(tiny_models, tmp_path):
    out = tmp_path / "awq"
    assert cli(["quantize", str(tiny_models["llama"]), "--scheme", "w4g32", "--method", "awq+gptq",
                "--no-act-order", "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out)]) == 0
    params = quantship.verify(out)["method"]
    assert params["name"] == "awq" and params["params"]["quantizer"] == "gptq"
    assert params["params"]["quantizer_params"]["act_order"] is False


# --- the composition computes what the methods computed before it (bit for bit) ----------------

# sha256 (first 16 hex) of every QuantLinear buffer after quantizing the tiny llama/qwen2 on fixed
# calibration tokens, recorded with the code before the transforms took their quantizer by name
# (then: --method awq+gptq with percdamp=..., smoothquant weight_method=rtn / weight_only=down_proj).
# Float results depend on the CPU's kernels: the recording machine is identified by PROBE.
RECORDED = {
    "awq_gptq_default": (("llama", "w4g32", "awq+gptq", {}, {}), "766863c74ebc66ad"),
    "awq_gptq_knobs": (("llama", "w3g32-asym", "awq", {"quantizer": "gptq", "gptq.percdamp": 0.1,
                                                       "gptq.act_order": False, "gptq.true_sequential": False,
                                                       "gptq.clip_search": False}, {}), "1b1251f893e66dc3"),
    "awq_rtn": (("llama", "w4g32", "awq", {}, {}), "cad716c9fbbff5fc"),
    "sq_rtn_clip": (("llama", "w8a8", "smoothquant", {"quantizer": "rtn", "clip": True}, {}), "d2b1f204a35e3abb"),
    "sq_weight_only": (("llama", "w8a8", "smoothquant", {}, {"down_proj": "w8"}), "adab15a7d71fc0cc"),
    "awq_gptq_qwen2": (("qwen2", "w4g32", "awq", {"quantizer": "gptq"}, {}), "abacf742bcfb0624"),
}
PROBE = "cf0455e505ed97ca"  # _float_probe() on the recording machine (AMD EPYC, AVX2), 1 or 2 threads


def _float_probe() -> str:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(96, 64, generator=g), torch.randn(64, 160, generator=g)
    h = a.t() @ a / 96 + 0.01 * torch.eye(64)
    parts = (a @ b, a[:8] @ b, h, torch.linalg.cholesky(h.double()))  # (not cholesky_inverse: varies with threads)
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in parts)).hexdigest()[:16]


def _buffers_hash(model) -> str:
    h = hashlib.sha256()
    for name, m in sorted(model.named_modules()):
        if isinstance(m, QuantLinear):
            for bname, b in sorted(m.named_buffers()):
                h.update(f"{name}.{bname}".encode())
                h.update(b.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_transforms_compute_the_recorded_weights_bit_for_bit(case):
    if _float_probe() != PROBE:
        pytest.skip(f"this CPU's float kernels differ from the recording machine's (probe {_float_probe()})")
    (arch, scheme, method, params, overrides), expected = RECORDED[case]
    model, tok = build_tiny_model(arch)
    tokens = torch.randint(2, 250, (6, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(scheme=scheme, method=method, method_params=tuple(params.items()),
                     overrides=tuple(overrides.items()))
    quantize_model(model, tok, spec, source=Path("."), progress=False, calib=tokens)
    assert _buffers_hash(model) == expected
