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
    verification = manifest["verification"]
    assert verification["passed"] and verification["weights"]["bit_exact"]
    assert verification["transformers"]["weights"]["bit_exact"]
    assert verification["transformers"]["logits"]["kld_mean"] < 1e-4
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


def test_per_layer_schemes_map_layer_by_layer(tiny_models, tmp_path):
    """Each module's own scheme decides its mapping: SmoothQuant W8A8 with down_proj kept weight-only int8
    gives two config groups (int-quantized + pack-quantized); GPTQ (one scheme per checkpoint) refuses."""
    import inspect

    # down_proj as int8 weight-only: a per-layer scheme override where quantize takes them, else the
    # SmoothQuant parameter that did the same before overrides existed
    keep = ({"overrides": {r"down_proj$": "w8"}} if "overrides" in inspect.signature(quantship.quantize).parameters
            else {"method_params": {"weight_only": "down_proj"}})
    src = quantship.quantize(str(tiny_models["llama"]), "w8a8", method="smoothquant", out=tmp_path / "mixed",
                             calib_samples=4, calib_seqlen=32, **keep, **QUIET)
    out = export(src, "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "mixed-precision"
    formats = {g["format"]: g["targets"] for g in q["config_groups"].values()}
    assert set(formats) == {"int-quantized", "pack-quantized"}
    assert all(t.endswith("down_proj") for t in formats["pack-quantized"])
    verification = read_export_manifest(out)["verification"]
    assert verification["passed"] and verification["weights"]["weights_compared"] == 14
    with pytest.raises(ExportError, match="w8a8"):
        export(src, "gptq", tmp_path / "g", log=lambda *a: None)


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


# ---------------------------------------------------------------------------------------------- GGUF

def _convert_hf_to_gguf_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, as published."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("scheme, qtype", [("w4g32", "Q4_0"), ("w8g32", "Q8_0"), ("w4g32-asym", "Q4_1"),
                                           ("w4g64", "Q4_0"), ("w8", "Q8_0")])
def test_gguf_round_trip_is_bit_exact(artifacts, tmp_path, scheme, qtype):
    """gguf.GGUFReader + gguf.quants.dequantize give quantship's dequantized weights bit for bit once the
    Q/K rows are put back (llama.cpp's published permutation); the tokenizer and chat template are embedded."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    src = artifacts("llama", scheme)
    out = export(src, "gguf", tmp_path / "gguf", log=lambda *a: None)
    manifest = read_export_manifest(out)
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["transformers_gguf"]["logits"]["kld_mean"] < 1e-4
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((src / "config.json").read_text())
    want = _dequantized(src)
    for name, w in want.items():
        layer, kind = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        assert t.tensor_type.name == qtype
        got = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(w.shape)
        expected = w
        if gname in ("attn_q", "attn_k"):
            kv = config["num_key_value_heads"] if gname == "attn_k" else config["num_attention_heads"]
            expected = _convert_hf_to_gguf_permute(w, config["num_attention_heads"], kv)
            assert not torch.equal(expected, w)  # the permutation is not the identity here
        assert torch.equal(got, expected), name
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type.name == "F32"


def test_gguf_embeds_the_chat_template(artifacts, tmp_path):
    import shutil

    import gguf

    from quantship.artifact import content_hash, manifest_digest
    from quantship.fsutil import sha256_file

    # an artifact whose tokenizer carries a chat template (re-sealed, as quantize would have written it)
    copy = tmp_path / "with-template"
    shutil.copytree(artifacts("llama", "w4g32"), copy)
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    (copy / "chat_template.jinja").write_text(template)
    manifest = json.loads((copy / "quantship.json").read_text())
    manifest["files"]["chat_template.jinja"] = sha256_file(copy / "chat_template.jinja")
    manifest["content_sha256"] = content_hash(manifest["files"])
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (copy / "quantship.json").write_text(json.dumps(manifest))
    out = export(copy, "gguf", tmp_path / "gguf", log=lambda *a: None)
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == template


@pytest.mark.parametrize("scheme, why", [
    ("nf4g32", "NormalFloat"),
    ("fp8", "float8"),
    ("w8a8", "activations"),
    ("w3g32", "4 or 8 bits"),
    ("w4g32-asym", None),  # maps (Q4_1): listed to keep the table complete
])
def test_gguf_refuses_unmappable_schemes(artifacts, tmp_path, scheme, why):
    if why is None:
        export(artifacts("llama", scheme), "gguf", tmp_path / "g", log=lambda *a: None)
        return
    with pytest.raises(ExportError, match=why) as err:
        export(artifacts("llama", scheme), "gguf", tmp_path / "g", log=lambda *a: None)
    assert scheme in str(err.value) and "\n" not in str(err.value)


def test_gguf_refuses_other_architectures(artifacts, tmp_path):
    with pytest.raises(ExportError, match="llama architecture.*qwen2"):
        export(artifacts("qwen2", "w4g32"), "gguf", tmp_path / "g", log=lambda *a: None)


def test_gguf_runs_in_llama_cpp(artifacts, tmp_path):
    """llama.cpp itself (llama-cpp-python) loads the export and its logits match quantship's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from quantship.export.base import kld_mean

    src = artifacts("llama", "w8g32")
    out = export(src, "gguf", tmp_path / "g", log=lambda *a: None)
    llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    model, tokenizer = quantship.load(src)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]
    assert llm.tokenize("The quick brown fox jumps over the lazy dog.".encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].float()
    assert kld_mean(ours, theirs) < 1e-3
    greedy = llm(" ", max_tokens=8, temperature=0.0)
    assert greedy["choices"][0]["text"] is not None
