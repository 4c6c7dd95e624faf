"""Formats: exact packing, grids, bits per weight, QuantLinear, scheme grammar."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantship import native
from quantship.formats.grid import NF4_CODEBOOK, quantize_weight
from quantship.formats.linear import QuantLinear
from quantship.formats.pack import pack_codes, packed_row_bytes, unpack_codes
from quantship.formats.scheme import parse_scheme


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 5), cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_is_exact(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits,nbytes", [(2, 2), (3, 3), (4, 4), (5, 5), (8, 8)])
def test_packing_is_dense(bits, nbytes):
    codes = torch.randint(0, 1 << bits, (3, 8), dtype=torch.uint8)
    assert pack_codes(codes, bits).shape == (3, nbytes)  # 8 codes -> `bits` bytes, no waste


def test_int4_layout_is_two_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 4)[0, :2].tolist() == [0x21, 0x0F]


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([[9]], dtype=torch.uint8), 3)


def _sqnr_db(w, w_q):
    return float(10 * torch.log10(w.pow(2).sum() / (w - w_q).pow(2).sum()))


# Gaussian weights: expected SQNR grows ~6 dB per bit; thresholds leave margin below measured values.
SQNR_FLOOR = {"w8": 40.0, "w8pt": 37.0, "w6g64": 30.0, "w4g64": 19.5, "w4g32-asym": 19.0, "w4": 17.5,
              "w3g64": 13.5, "w2g64": 7.0, "w2g64-asym": 6.5, "nf4g64": 19.5, "fp8": 30.0, "w8a8": 40.0}


@pytest.mark.parametrize("scheme", sorted(SQNR_FLOOR))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqnr_per_scheme(scheme, dtype):
    torch.manual_seed(0)
    w = torch.randn(128, 256).to(dtype)
    qw = quantize_weight(parse_scheme(scheme), w)
    assert _sqnr_db(w.float(), qw.dequantize()) > SQNR_FLOOR[scheme]


def test_asym_reproduces_a_q4_1_grid_exactly():
    # A weight already on a per-group (scale, min) 4-bit grid is recovered exactly by w4g32-asym.
    torch.manual_seed(1)
    d = (torch.rand(16, 2, 1) * 0.1 + 0.01).half().float()
    m = -torch.rand(16, 2, 1).half().float()
    q = torch.randint(0, 16, (16, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # the group's min and max are on the grid's ends
    w = (q * d + m).reshape(16, 64)
    qw = quantize_weight(parse_scheme("w4g32-asym"), w)
    assert torch.allclose(qw.dequantize(), w, atol=1e-6)


def test_nf4_codebook_matches_the_qlora_levels():
    known = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
             0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    assert torch.allclose(NF4_CODEBOOK, torch.tensor(known), atol=1e-6)


@pytest.mark.parametrize("scheme,bpw", [("w4g32", 4.5), ("w4g32-asym", 5.0), ("w4g64", 4.25), ("w8", 8 + 16 / 256),
                                        ("w3g64", 3.25), ("nf4g64", 4.25), ("fp8", 8 + 32 / 256), ("w2g64-asym", 2.5)])
def test_bits_per_weight(scheme, bpw):
    assert parse_scheme(scheme).bits_per_weight(128, 256) == pytest.approx(bpw)


@pytest.mark.parametrize("scheme", ["w8", "w4g64", "w4g32-asym", "w3g64", "w2g64", "w4pt", "nf4g64", "fp8", "w5g32"])
def test_quantlinear_matches_dequantized_reference(scheme):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128), torch.randn(96), torch.randn(3, 7, 128)
    qw = quantize_weight(parse_scheme(scheme), w)
    layer = QuantLinear.from_quantized(qw, b)
    expected = torch.nn.functional.linear(x, qw.dequantize(), b)
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.codes(), qw.codes)
    # the layer keeps packed codes: a 4-bit layer stores half a byte per weight
    assert layer.qweight.numel() == 96 * packed_row_bytes(128, qw.scheme.bits)


@pytest.mark.parametrize("name", ["w8", "w4g64", "w4g32-asym", "w3g64", "w8pt", "nf4g64", "fp8", "w8a8", "w2g128-asym"])
def test_scheme_names_round_trip(name):
    assert parse_scheme(name).name == name


@pytest.mark.parametrize("bad", ["w9", "w1g64", "w4g", "int4", "w4g12", "nf4", "w4-sym", "fp4"])
def test_bad_scheme_names_list_the_grammar(bad):
    with pytest.raises(ValueError, match="grammar|multiple of 8"):
        parse_scheme(bad)


W8_KERNEL = "int8_native" if native.available() else "int8_weight_only"
W4_KERNEL = "int4_native" if native.available() else "int4_group"


@pytest.mark.parametrize("scheme,kernel", [("w8", W8_KERNEL), ("w4g32", W4_KERNEL),
                                           ("w4g64-asym", W4_KERNEL), ("w3g64", "reference"),
                                           ("nf4g64", "reference")])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_kernels_match_the_reference_path(scheme, kernel, bias):
    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(2, 5, 128)
    layer = QuantLinear.from_quantized(quantize_weight(parse_scheme(scheme), w), torch.randn(96) if bias else None)
    expected = layer(x)
    assert layer.prepare_fast() == kernel
    got = layer(x)
    # bf16 activations in the integer kernels: relative error ~1e-2 of the output scale
    assert torch.allclose(got, expected, atol=0.05 * float(expected.abs().max()), rtol=0)
    assert float((got - expected).pow(2).mean() / expected.pow(2).mean()) < 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_int8_kernel_dense_prefill_path_is_fp32_exact(bias):
    from quantship.formats.kernels import INT8_DENSE_MIN_ROWS

    torch.manual_seed(0)
    w, x = torch.randn(96, 128), torch.randn(INT8_DENSE_MIN_ROWS + 3, 128)
    layer = QuantLinear.from_quantized(quantize_weight(parse_scheme("w8"), w), torch.randn(96) if bias else None)
    expected = layer(x)
    assert layer.prepare_fast() == W8_KERNEL
    # many rows: dequantize + fp32 GEMM, i.e. the reference computation up to summation order
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    few = layer(x[:2])  # few rows: the int8 GEMV
    if W8_KERNEL == "int8_native":  # fp32 activations and accumulation: the reference up to summation order
        assert torch.allclose(few, expected[:2], atol=1e-4, rtol=1e-5)
    else:  # torch's kernel runs bf16 activations
        assert not torch.allclose(few, expected[:2], atol=1e-5, rtol=1e-5)
        assert torch.allclose(few, expected[:2], atol=0.05 * float(expected.abs().max()), rtol=0)


def test_released_codes_refuse_to_dequantize():
    layer = QuantLinear.from_quantized(quantize_weight(parse_scheme("w4g32"), torch.randn(32, 64)), None)
    layer.prepare_fast(release_codes=True)
    layer(torch.randn(1, 64))
    with pytest.raises(RuntimeError, match="released"):
        layer.dequantize()


def test_int8_storage_is_twos_complement_for_the_kernel():
    qw = quantize_weight(parse_scheme("w8"), torch.randn(16, 32))
    layer = QuantLinear.from_quantized(qw, None)
    assert torch.equal(layer.qweight.view(torch.int8).to(torch.int16), qw.codes.to(torch.int16) - 128)
    assert torch.equal(layer.codes(), qw.codes)
