"""Native kernels (quantship/native): int8 / fp32 GEMV and the decode-layer op against torch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import quantship
from quantship import native
from quantship.engine import Engine, SamplingParams

from conftest import build_tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")

PROMPTS = ["The quick brown fox", "def add(a, b):", "Quantization maps real numbers", "Perplexity"]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_and_fp32_gemv_match_torch(rows, bias):
    torch.manual_seed(rows)
    n, k = 83, 96
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale, b, x = torch.rand(n) * 0.01, (torch.randn(n) if bias else None), torch.randn(rows, k)
    expected = torch.nn.functional.linear(x, w.float() * scale[:, None], b)
    got = torch.ops.quantship.int8_linear(x, w, scale, b)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    wf = torch.randn(n, k)
    assert torch.allclose(torch.ops.quantship.fp32_linear(x, wf, b), torch.nn.functional.linear(x, wf, b),
                          atol=1e-4, rtol=1e-5)


def test_gemv_rejects_bad_input_with_a_message():
    w, s = torch.zeros(8, 40, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.quantship.int8_linear(torch.zeros(1, 40), w, s, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.quantship.int8_linear(torch.zeros(1, 32, dtype=torch.float64), w[:, :32].contiguous(), s, None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.quantship.fp32_linear(torch.zeros(1, 64), torch.zeros(8, 32), None)


def _next_logits(engine, prompts):
    """Prefill every prompt (slots 0..n-1), then one batched decode step: -> its logits (n, V)."""
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefills + first decode
    ids = torch.tensor([r.output[-1] for r in engine.running])
    positions = torch.tensor([r.length for r in engine.running])
    return engine.forward.decode(ids, positions, engine.cache)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])  # qwen3: per-head q/k RMSNorm
@pytest.mark.parametrize("kv", ["float32", "bfloat16", "int8"])
def test_native_decode_step_matches_the_python_step(arch, kv):
    model, tok = build_tiny_model(arch, seed=3)
    fast = Engine(model, tok, max_batch=4, kv_cache=kv)
    assert fast.decode_path == "native"
    native_logits = _next_logits(fast, PROMPTS)
    # the same step again through the Python layer loop (it rewrites the same cache rows with equal values)
    ids = torch.tensor([r.output[-1] for r in fast.running])
    positions = torch.tensor([r.length for r in fast.running])
    fast.forward.native, saved = None, fast.forward.native
    python_logits = fast.forward.decode(ids, positions, fast.cache)
    fast.forward.native = saved
    assert torch.allclose(native_logits, python_logits, atol=2e-4, rtol=1e-4)


def test_native_decode_generates_like_the_reference_engine_for_each_scheme(tiny_models):
    for scheme, kernel in (("w8", "int8_native"), ("w4g32", "int4_native"), ("w4g64-asym", "int4_native"),
                           ("w8a8", "w8a8_int8_int_mm")):
        r = quantship.quantize(str(tiny_models["llama"]), scheme, progress=False, log=lambda *a: None)
        reference = Engine(r.model, r.tokenizer, fast=False, max_batch=4)
        expected = [_next_logits(reference, PROMPTS)]
        fast = Engine(r.model, r.tokenizer, max_batch=4)
        assert fast.decode_path == "native" and fast.kernels.get(kernel, 0) > 0, (scheme, fast.kernels)
        got = _next_logits(fast, PROMPTS)
        lp_e, lp_f = torch.log_softmax(expected[0], -1), torch.log_softmax(got, -1)
        kld = float((lp_e.exp() * (lp_e - lp_f)).sum(-1).max())
        # int8 is fp32-exact up to summation order; int4 rounds activations to int8 per 32; w8a8 the same codes
        assert kld < {"w8": 1e-6, "w4g32": 1e-2, "w4g64-asym": 1e-2, "w8a8": 1e-4}[scheme], (scheme, kld)


def test_unsupported_cases_keep_the_python_decode(tiny_models):
    model, tok = build_tiny_model("llama", seed=3)
    assert Engine(model, tok, kv_cache="fp8").decode_path == "python"  # no native fp8 cache
    r = quantship.quantize(str(tiny_models["llama"]), "nf4g64", progress=False, log=lambda *a: None)
    assert Engine(r.model, r.tokenizer).decode_path == "python"  # nf4 has only the reference kernel


def test_disabled_native_falls_back_to_torch_kernels():
    code = ("from quantship import native; from quantship.formats.kernels import select_kernel; "
            "from quantship.formats.linear import QuantLinear; from quantship.formats.grid import quantize_weight; "
            "from quantship.formats.scheme import parse_scheme; import torch; "
            "l = QuantLinear.from_quantized(quantize_weight(parse_scheme('w8'), torch.randn(8, 64)), None); "
            "print(native.available(), native.unavailable_reason(), select_kernel(l)[0])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QUANTSHIP_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False" and "QUANTSHIP_NATIVE=0" in out and out.split()[-1] == "int8_weight_only"


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the int4 kernel sees it: rounded to int8 per block of 32 (absmax / 127)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(step > 0, step, 1)) * step).reshape(x.shape)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("n", [72, 75, 2])  # output rows: whole 4-row tiles, a 3-row tail, fewer than a tile
def test_int4_gemv_equals_matmul_with_block_quantized_activations(group, rows, asym, n):
    from quantship.native import pack_int4_blocks

    torch.manual_seed(group + rows)
    k = 256
    codes = torch.randint(0, 16, (n, k))
    scale = (torch.rand(n, k // group) * 0.01).half()
    offset = (torch.randn(n, k // group) * 0.01).half() if asym else None
    w = (codes.float() * scale.float().repeat_interleave(group, 1)
         + (offset.float().repeat_interleave(group, 1) if asym else -8 * scale.float().repeat_interleave(group, 1)))
    packed, bias, x = pack_int4_blocks(codes), torch.randn(n), torch.randn(rows, k)
    assert torch.equal(torch.ops.quantship.int4_dequantize(packed, scale, offset, group), w)
    got = torch.ops.quantship.int4_linear(x, packed, scale, offset, bias, group)
    # exactly the matmul of block-quantized activations (up to summation order) ...
    assert torch.allclose(got, torch.nn.functional.linear(_int8_blocks(x), w, bias), atol=1e-4, rtol=1e-5)
    # ... which is within ~1% of the float activations' result
    exact = torch.nn.functional.linear(x, w, bias)
    assert float((got - exact).abs().max()) < 0.02 * float(exact.abs().max())


def test_int4_rejects_a_bad_group_with_a_message():
    w, s = torch.zeros(4, 48, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.quantship.int4_linear(torch.zeros(1, 96), w, s, None, None, 48)


def test_weight_bytes_count_fused_and_repacked_weights(tiny_models):
    """Bandwidth = bytes read per token x tok/s: the fused q/k/v, gate/up and repacked int4 copies must count."""
    for scheme in ("w8", "w4g32"):
        r = quantship.quantize(str(tiny_models["llama"]), scheme, progress=False, log=lambda *a: None)
        stored = sum(m.storage_bytes() for layer in r.model.model.layers for m in layer.modules()
                     if hasattr(m, "storage_bytes"))
        engine = Engine(r.model, r.tokenizer)
        assert engine.fused > 0
        head = engine.forward.head.storage_bytes()
        norms = sum(p.numel() * 4 for layer in engine.forward.layers for n, p in layer.named_parameters() if "norm" in n)
        assert stored + head <= engine.weight_bytes() <= 1.1 * (stored + head) + norms + 4 * r.model.config.hidden_size


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("Error building extension 'quantship_native': g++ not found")

    monkeypatch.setattr(native, "_build_outcome", {})  # as in a fresh process; restored after the test
    monkeypatch.setattr(native, "_build", no_compiler)
    assert native.available() is False
    assert "g++ not found" in native.unavailable_reason()
    assert "using torch's kernels" in caplog.text
    from quantship.formats.kernels import select_kernel
    from quantship.formats.linear import QuantLinear
    from quantship.formats.grid import quantize_weight
    from quantship.formats.scheme import parse_scheme

    layer = QuantLinear.from_quantized(quantize_weight(parse_scheme("w8"), torch.randn(8, 64)), None)
    assert select_kernel(layer)[0] == "int8_weight_only"


def test_an_interrupted_build_lock_is_removed_when_stale(monkeypatch, tmp_path):
    import time

    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("QUANTSHIP_HOME", str(tmp_path))
    lock = tmp_path / "native" / native._source_hash() / "lock"
    lock.parent.mkdir(parents=True)
    seen = []
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(lock.exists()))
    lock.touch()  # a build running right now: its lock stays
    native._build()
    old = time.time() - 2 * native._STALE_LOCK_S
    os.utime(lock, (old, old))  # a build killed long ago: torch would wait on this lock forever
    native._build()
    assert seen == [True, False]
