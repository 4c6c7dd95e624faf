"""Exports: every writer maps quantship's grids exactly (checked through the target's own reader),
refuses what it cannot map naming the scheme and why, and writes atomically under --force rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantship
from quantship.cli import main as cli
from quantship.export import EXPORT_MANIFEST, ExportError, export
from quantship.export.base import read_export_manifest

QUIET = dict(progress=False, log=lambda *a, **k: None)
ARCHS = ("llama", "qwen2")  # qwen2: biases on q/k/v and an untied head


@pytest.fixture(scope="module")
def artifacts(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, scheme: str) -> Path:
        if (arch, scheme) not in cache:
            cache[arch, scheme] = quantship.quantize(str(tiny_models[arch]), scheme, out=root / f"{arch}-{scheme}",
                                                     **QUIET)
        return cache[arch, scheme]

    return get


def _dequantized(artifact: Path) -> dict[str, torch.Tensor]:
    model, _ = quantship.load(artifact)
    manifest = json.loads((artifact / "quantship.json").read_text())
    return {name: model.get_submodule(name).dequantize() for name in manifest["modules"]}


# ---------------------------------------------------------------------------------------------- compressed-tensors

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["w4g32", "w4g64", "w8", "w8g32", "w8a8", "fp8"])
def test_compressed_tensors_round_trip_is_bit_exact(artifacts, tmp_path, arch, scheme):
    """Decompressed by the compressed-tensors library (via transformers, CPU), every weight equals
    quantship's dequantized weight bit for bit, and the logits agree (KLD < 1e-4)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    src = artifacts(arch, scheme)
    out = export(src, "compressed-tensors", tmp_path / "ct", **{"log": lambda *a: None})
    manifest = read_export_manifest(out)
    assert manifest["source_artifact"]["content_sha256"] == json.loads((src / "quantship.json").read_text())[
        "content_sha256"]
    assert manifest["verification"]["passed"] and manifest["verification"]["weights"]["bit_exact"]
    assert manifest["verification"]["logits"]["kld_mean"] < 1e-4
    # independently of the writer's own check: decompress each layer with the library's compressor
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    state = load_file(str(out / "model.safetensors"))
    want = _dequantized(src)
    by_name = {t: g for g in config["config_groups"].values() for t in g["targets"]}
    assert set(by_name) == set(want)
    for name, w in want.items():
        group = by_name[name]
        scheme_obj = QuantizationScheme.model_validate({k: v for k, v in group.items()})
        local = {k[len(name) + 1:]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        got = BaseCompressor.load_from_registry(group["format"]).decompress(local, scheme_obj)["weight"]
        assert got.dtype == torch.float32
        assert torch.equal(got, w), name
    assert "lm_head" in config["ignore"]


def test_compressed_tensors_config_groups_and_formats(artifacts, tmp_path):
    out = export(artifacts("llama", "w8a8"), "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    (group,) = q["config_groups"].values()
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True, "group_size": None}
    out = export(artifacts("llama", "w4g64"), "compressed-tensors", tmp_path / "ct4", log=lambda *a: None)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 64
    assert group["weights"]["strategy"] == "group" and group["weights"]["symmetric"] is True


def test_negative_scales_are_kept_exactly(artifacts):
    """quantship's symmetric grid puts the signed extreme on code 0, so scales are negative where that
    extreme is positive; the export relies on (q - 8) * s being the same product as q_ct * s."""
    from quantship.export.base import SourceArtifact

    src = SourceArtifact.open(artifacts("llama", "w4g32"))
    scales = torch.cat([m.scales.float().flatten() for m in src.modules.values()])
    assert (scales < 0).any() and (scales > 0).any()


@pytest.mark.parametrize("scheme, why", [
    ("w4g32-asym", "integer zero point"),
    ("nf4g32", "NormalFloat"),
    ("w3g32", "4 or 8 bits"),
    ("w8pt", "one scale per tensor"),
])
def test_compressed_tensors_refuses_unmappable_schemes(artifacts, tmp_path, scheme, why):
    with pytest.raises(ExportError, match=why) as err:
        export(artifacts("llama", scheme), "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    assert scheme in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ct").exists()


# ---------------------------------------------------------------------------------------------- the command

def test_export_command_force_rules(artifacts, tmp_path, capsys):
    src = artifacts("llama", "w4g64")
    out = tmp_path / "ct"
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(out)]) == 0
    first = read_export_manifest(out)["content_sha256"]
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(out), "--force"]) == 0
    assert read_export_manifest(out)["content_sha256"] == first  # same source, same bytes
    (out / "notes.txt").write_text("mine")
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(out), "--force"]) == 1
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_text("x")
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(other), "--force"]) == 1
    assert EXPORT_MANIFEST in capsys.readouterr().err and (other / "data.bin").exists()
    assert cli(["export", str(src), "--to", "compressed-tensors", "-o", str(src), "--force"]) == 1
    assert "source artifact" in capsys.readouterr().err
    assert cli(["export", str(src), "--to", "nope", "-o", str(tmp_path / "x")]) == 1
    assert "valid:" in capsys.readouterr().err


def test_export_refuses_a_tampered_artifact(artifacts, tmp_path):
    import shutil

    from quantship.artifact import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(artifacts("llama", "w4g64"), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        export(copy, "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    assert not (tmp_path / "ct").exists()


# ---------------------------------------------------------------------------------------------- GPTQ

def _autogptq_reference_dequant(folder: Path) -> dict[str, torch.Tensor]:
    """AutoGPTQ's reference QuantLinear dequantization (qlinear_cuda_old, v1 zeros), written out here as a
    second reader: unpack by shifts in int8/int16, mask, zeros + 1, scales[g_idx] * (w - zeros[g_idx])."""
    from safetensors.torch import load_file

    qc = json.loads((folder / "quantize_config.json").read_text())
    bits = qc["bits"]
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    state = load_file(str(folder / "model.safetensors"))
    small = torch.int16 if bits == 8 else torch.int8
    out = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qweight, qzeros, scales, g_idx = (state[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx"))
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 32 // bits), wf.unsqueeze(0)).to(small)
        zeros = torch.bitwise_and(zeros, (2 ** bits) - 1) + 1
        zeros = zeros.reshape(scales.shape)
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1)).to(small)
        weight = torch.bitwise_and(weight, (2 ** bits) - 1).reshape(-1, qweight.shape[1])
        out[name] = (scales.float()[g_idx.long()] * (weight - zeros[g_idx.long()]).float()).t()
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["w4g32", "w4g64", "w4", "w8", "w8g32"])
def test_gptq_round_trip_is_bit_exact(artifacts, tmp_path, arch, scheme):
    src = artifacts(arch, scheme)
    out = export(src, "gptq", tmp_path / "gptq", log=lambda *a: None)
    manifest = read_export_manifest(out)
    assert manifest["verification"]["passed"] and manifest["verification"]["logits"]["kld_mean"] < 1e-4
    qc = json.loads((out / "quantize_config.json").read_text())
    bits = int(scheme[1])
    assert qc["bits"] == bits and qc["sym"] is True and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    assert qc["group_size"] == (int(scheme.split("g")[1]) if "g" in scheme else -1)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    want = _dequantized(src)
    got = _autogptq_reference_dequant(out)
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        name = next(iter(want))
        out_f, in_f = want[name].shape
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert tuple(f.get_tensor(f"{name}.qweight").shape) == (in_f * bits // 32, out_f)
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        zeros = f.get_tensor(f"{name}.qzeros")
        assert tuple(zeros.shape) == (qc["group_size"] > 0 and in_f // qc["group_size"] or 1, out_f * bits // 32)
        # symmetric: every stored zero is 2^(b-1) - 1 (v1 stores zero - 1)
        assert set(zeros.view(torch.uint8).unique().tolist()) == ({0x77} if bits == 4 else {0x7F})


@pytest.mark.parametrize("scheme, why", [
    ("w4g32-asym", "integer zero"),
    ("w8a8", "weight-only"),
    ("nf4g32", "no GPTQ grid"),
    ("fp8", "no GPTQ grid"),
    ("w3g32", "4 or 8 bits"),
])
def test_gptq_refuses_unmappable_schemes(artifacts, tmp_path, scheme, why):
    with pytest.raises(ExportError, match=why) as err:
        export(artifacts("llama", scheme), "gptq", tmp_path / "g", log=lambda *a: None)
    assert scheme in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "g").exists()


def test_a_wrong_export_fails_verification_and_is_not_written(artifacts, tmp_path, monkeypatch):
    """The verification is not vacuous: one flipped code in the written qweight fails it, and nothing is left."""
    from quantship.export import gptq

    real = gptq._module_tensors

    def corrupt(m):
        tensors = real(m)
        tensors["qweight"] = tensors["qweight"].clone()
        tensors["qweight"][0, 0] ^= 1
        return tensors

    monkeypatch.setattr(gptq, "_module_tensors", corrupt)
    with pytest.raises(ExportError, match="failed verification"):
        export(artifacts("llama", "w4g64"), "gptq", tmp_path / "g", log=lambda *a: None)
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))
