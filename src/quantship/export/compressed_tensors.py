"""compressed-tensors export (the checkpoint format vLLM and transformers load).

Mapping (exact; docs/export.md):
    w4g*/w8g*/w4/w8 (symmetric)  -> pack-quantized, weights int{b} symmetric, strategy group/channel:
                                    value = q_ct * scale with q_ct = q - 2^(b-1) in [-2^(b-1), 2^(b-1)),
                                    which is quantship's (q - 2^(b-1)) * s term for term; the stored
                                    unsigned nibble/byte (q_ct + 2^(b-1)) is quantship's code q.
    w8a8 (dynamic)               -> int-quantized: int8 weights per channel + int8 activations
                                    quantized per token at run time (dynamic).
    fp8                          -> float-quantized: float8 E4M3 weights, float32 scale per channel.
Scales are written as float32 (they hold quantship's fp16 values exactly), so the reader's
dequantization (q * scale in the scale's dtype) reproduces quantship's float32 weight bit for bit.
quantship's symmetric scale may be negative (the group's signed extreme sits on the lowest code);
q * scale is the same product either way.
Refused: -asym (quantship stores a float minimum, q*s + o; compressed-tensors stores an integer
zero point, (q - z)*s, and o/s is not an integer), nf4 (no NormalFloat codebook), per-tensor
scales and bit widths other than 4 and 8 (vLLM's kernels for this format take 4 or 8 bits per
group or channel), w8a8 with a static activation scale.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from ..formats.pack import pack_codes
from . import Writer, register_writer
from .base import (ExportError, module_state, SourceArtifact, check_ids, compare_weights, copy_side_files, kld_mean,
                   library_version, quantship_logits, refuse_unmappable, require, weight_check_summary)

TARGET = "compressed-tensors"
KLD_LIMIT = 1e-4  # transformers' CPU load vs quantship's own forward


def _reason(m) -> str | None:
    s = m.scheme
    if s.kind == "nf4":
        return "compressed-tensors has no NormalFloat-4 codebook"
    if s.kind == "fp8":
        return None
    if not s.symmetric:
        return ("quantship's asymmetric grid is q*s + o with a float16 minimum o (llama.cpp's Q4_1 layout); "
                "compressed-tensors stores an integer zero point, (q - z)*s, and o/s is not an integer, so "
                "the values cannot be reproduced exactly")
    if s.bits not in (4, 8):
        return f"vLLM's kernels for compressed-tensors integer weights take 4 or 8 bits, not {s.bits}"
    if s.granularity == "tensor":
        return "vLLM's weight-only integer kernels take group or channel scales, not one scale per tensor"
    if s.act_bits and m.act_scale is not None:
        return ("the layer has a static (calibrated) activation scale; compressed-tensors' static int8 "
                "activations clamp to [-128, 127] while quantship clamps to [-127, 127]; export the dynamic w8a8")
    return None


def _weights_args(s) -> dict:
    if s.kind == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
                "group_size": None}
    strategy = "group" if s.granularity == "group" else "channel"
    return {"num_bits": s.bits, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False,
            "group_size": s.group_size if strategy == "group" else None}


def _format(s) -> str:
    if s.kind == "fp8":
        return "float-quantized"
    return "int-quantized" if s.act_bits else "pack-quantized"


def plan(src: SourceArtifact) -> dict:
    refuse_unmappable(TARGET, src, _reason)
    _check_linear(src)
    mapping = {}
    for name, m in src.modules.items():
        fmt = _format(m.scheme)
        tensors = {"pack-quantized": ["weight_packed", "weight_scale", "weight_shape"],
                   "int-quantized": ["weight", "weight_scale"],
                   "float-quantized": ["weight", "weight_scale"]}[fmt]
        mapping[name] = {"source_scheme": m.scheme.name, "format": fmt, "weights": _weights_args(m.scheme),
                         "input_activations": "int8 dynamic per token" if m.scheme.act_bits else None,
                         "tensors": [f"{name}.{t}" for t in tensors] + ([f"{name}.bias"] if m.bias is not None else [])}
    return mapping


def _check_linear(src: SourceArtifact) -> None:
    from torch import nn

    from .base import is_linear_like

    # QuantLinear replaced the layers in the loaded model: inspect a weightless model built from the config
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src.path))
    conv = [n for n in src.modules if is_linear_like(skeleton.get_submodule(n))
            and not isinstance(skeleton.get_submodule(n), nn.Linear)]
    if conv:
        raise ExportError(f"cannot export {src.path} to {TARGET}: its layers ({conv[0]} ...) are transformers "
                          f"Conv1D (GPT-2 style, weight stored transposed), which compressed-tensors does not target")


def _scheme_group(entry: dict, names: list[str]) -> dict:
    group = {"targets": names, "weights": entry["weights"], "input_activations": None, "output_activations": None,
             "format": entry["format"]}
    if entry["input_activations"]:
        group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True, "group_size": None}
    return group


def quantization_config(src: SourceArtifact, mapping: dict) -> dict:
    """config.json's quantization_config: one config group per (format, weights, activations), targets by name."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, entry in mapping.items():
        key = json.dumps([entry["format"], entry["weights"], entry["input_activations"]], sort_keys=True)
        groups.setdefault(key, (entry, []))[1].append(name)
    config_groups = {f"group_{i}": _scheme_group(entry, names) for i, (entry, names) in enumerate(groups.values())}
    formats = {entry["format"] for entry in mapping.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": src.float_linear_names(),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _module_tensors(m) -> dict[str, torch.Tensor]:
    s = m.scheme
    out_f, in_f = m.shape
    scale = m.scales.float().reshape(out_f, -1).contiguous()
    if s.kind == "fp8":
        return {"weight": m.codes.view(torch.float8_e4m3fn).contiguous(), "weight_scale": scale}
    if s.act_bits:  # int-quantized: int8 weight, q_ct = q - 128
        return {"weight": (m.codes.to(torch.int16) - 128).to(torch.int8).contiguous(), "weight_scale": scale}
    # pack-quantized: `bits` int32 words per 32 codes, code i at bits [bits*i, bits*(i+1)) of the little-endian
    # stream; for 4 and 8 bits that is quantship's byte packing of the unsigned codes, read as int32
    packed = pack_codes(m.codes, s.bits)
    words = -(-in_f * s.bits // 32)
    if packed.shape[1] < words * 4:
        packed = torch.cat([packed, torch.zeros(out_f, words * 4 - packed.shape[1], dtype=torch.uint8)], dim=1)
    return {"weight_packed": packed[:, : words * 4].contiguous().view(torch.int32),
            "weight_scale": scale, "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}


def write(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    from safetensors.torch import save_file

    state = module_state(src, _module_tensors)
    config = dict(src.config)
    if config.get("tie_word_embeddings") and any(k in src.modules for k in src.tied):
        config["tie_word_embeddings"] = False  # the head is quantized: it no longer shares the embedding
        for key, target in src.tied.items():
            if key.rpartition(".")[0] not in src.modules:
                state[key] = state[target].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(src, tmp, skip=("config.json",))
    config["quantization_config"] = quantization_config(src, mapping)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"format": config["quantization_config"]["format"]}


def library_decompress(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized layer's dense weight, decompressed by the compressed-tensors library with its own
    config group's scheme and format (the per-layer path vLLM also takes)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for group in config["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(group.get("format") or config["format"])
        for name in group["targets"]:
            local = {k[len(name) + 1:]: v for k, v in state.items() if k.rpartition(".")[0] == name}
            out[name] = compressor.decompress(local, scheme)["weight"]
    return out


def verify(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    """Every quantized weight decompressed by the compressed-tensors library (per config group) must equal
    quantship's dequantized weight bit for bit; then transformers loads the export on CPU (decompressed):
    its weights and float tensors must match too, and its logits on a fixed text (KLD < 1e-4).
    transformers dequantizes one scheme per checkpoint, so a mixed export (several config groups) gets
    the per-layer library check and no transformers load."""
    require("compressed_tensors", "compressed-tensors", TARGET)
    started = time.perf_counter()
    dense = library_decompress(tmp)
    records = [compare_weights(f"{name}.weight", dense[name], m.dequantize()) if name in dense
               else {"tensor": f"{name}.weight", "bit_exact": False, "why": "missing"}
               for name, m in src.modules.items()]
    weights = weight_check_summary(records, f"compressed-tensors {library_version('compressed-tensors')}")
    groups = len(json.loads((tmp / "config.json").read_text())["quantization_config"]["config_groups"])
    result = {"weights": weights, "seconds": None}
    why = None if weights["bit_exact"] else f"weights differ from quantship's ({', '.join(weights['mismatched'][:5])})"
    summary = f"{weights['weights_compared']} quantized weights bit-exact through {weights['reader']}"
    if groups == 1:
        hf = _transformers_check(src, tmp)
        result["transformers"] = hf
        summary += (f"; transformers load: {hf['weights']['weights_compared']} tensors bit-exact, logits KLD "
                    f"{hf['logits']['kld_mean']:.2e} over {hf['logits']['tokens']} tokens")
        if why is None and not hf["weights"]["bit_exact"]:
            why = f"transformers loads other weights ({', '.join(hf['weights']['mismatched'][:5])})"
        elif why is None and hf["logits"]["kld_mean"] >= KLD_LIMIT:
            why = f"transformers' logits differ from quantship's: KLD {hf['logits']['kld_mean']:.3g} >= {KLD_LIMIT:g}"
    else:
        result["transformers"] = {"skipped": f"{groups} config groups; transformers "
                                             f"{library_version('transformers')} dequantizes one scheme per checkpoint"}
        summary += f" ({groups} config groups: no transformers load)"
    result.update(passed=why is None, why=why, summary=summary, seconds=round(time.perf_counter() - started, 3))
    return result


def _transformers_check(src: SourceArtifact, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model already has a quantization_config": we only add dequantize=True
        warnings.simplefilter("ignore", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    model.eval()
    records = []
    for name, m in src.modules.items():
        layer = model.get_submodule(name)
        records.append(compare_weights(f"{name}.weight", layer.weight.detach(), m.dequantize()))
        if m.bias is not None:
            records.append(compare_weights(f"{name}.bias", layer.bias.detach(), m.bias.float()))
    state = model.state_dict()
    for key, t in src.float_tensors.items():
        if key in state:
            records.append(compare_weights(key, state[key], t.float()))
    weights = weight_check_summary(records, f"transformers {library_version('transformers')} + "
                                            f"compressed-tensors {library_version('compressed-tensors')}")
    ids = check_ids(src.tokenizer)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[0].float()
    ours = quantship_logits(src, ids)
    return {"weights": weights,
            "logits": {"runtime": "transformers (CPU, decompressed)", "tokens": int(ids.shape[1]),
                       "kld_mean": kld_mean(ours, theirs), "limit": KLD_LIMIT,
                       "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}}


register_writer(Writer(TARGET, plan, write, verify,
                       "vLLM / transformers checkpoint (pack-quantized, int-quantized, float-quantized)"))
