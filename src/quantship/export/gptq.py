"""GPTQ export (AutoGPTQ / GPTQModel "v1" checkpoints, loaded by vLLM and transformers).

Per quantized linear `L` (W of shape (out, in), groups of `group` input columns, b bits, pf = 32 / b):
    L.qweight  int32 (in / pf, out)       code of W[o, i] at bits [b*(i % pf), b*(i % pf + 1)) of qweight[i // pf, o]
    L.qzeros   int32 (n_groups, out / pf) (zero - 1) of column o at bits [b*(o % pf), ...) of qzeros[g, o // pf]
    L.scales   float16 (n_groups, out)
    L.g_idx    int32 (in,)                group of input column i (i // group; 0 for per-channel)
    value = scales[g_idx[i], o] * (q - (stored_zero + 1))          (the v1 zero-point convention)
quantship's symmetric grid is (q - 2^(b-1)) * s with the same unsigned code q and an fp16 scale s
(negative where the group's extreme is positive): zero = 2^(b-1) for every group, stored as
2^(b-1) - 1, scales = s. So the mapping is exact. Refused: -asym (quantship's offset is a float
minimum, GPTQ's zero an integer code), nf4, fp8, w8a8 (GPTQ is weight-only), per-tensor scales,
bit widths other than 4 and 8, and artifacts whose layers use different schemes (one
quantize_config holds one bits/group_size).

There is no third-party GPTQ reader that runs here (GPTQModel's wheel pulls another torch and the
CUDA stack; transformers' GPTQ integration needs it), so verification reads the files back with
`read_gptq_v1`, an independent implementation of AutoGPTQ's reference dequantization (its
`QuantLinear` unpack by shifts, v1 `zeros + 1`), then runs the dense model built from config.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import Writer, register_writer
from .base import (ExportError, module_state, SourceArtifact, check_ids, compare_weights, copy_side_files, kld_mean,
                   quantship_logits, refuse_unmappable, weight_check_summary)

TARGET = "gptq"
KLD_LIMIT = 1e-4


def _reason(m) -> str | None:
    s = m.scheme
    if s.kind != "int":
        return f"GPTQ stores integer codes; {s.kind} values have no GPTQ grid"
    if s.act_bits:
        return "GPTQ checkpoints are weight-only; w8a8 quantizes activations too (export it to compressed-tensors)"
    if not s.symmetric:
        return ("quantship's asymmetric grid is q*s + o with a float16 minimum o; GPTQ stores an integer zero "
                "point, (q - z)*s, and o/s is not an integer, so the values cannot be reproduced exactly")
    if s.bits not in (4, 8):
        return f"exported GPTQ checkpoints take 4 or 8 bits (one int32 holds 8 or 4 codes), not {s.bits}"
    if s.granularity == "tensor":
        return "GPTQ has a scale per group or per output channel, not one per tensor"
    return None


def plan(src: SourceArtifact) -> dict:
    refuse_unmappable(TARGET, src, _reason)
    schemes = sorted({m.scheme.name for m in src.modules.values()})
    if len(schemes) > 1:
        raise ExportError(f"cannot export {src.path} to {TARGET}: its layers use {len(schemes)} schemes "
                          f"({', '.join(schemes)}) but a GPTQ checkpoint has one bits/group_size; export it to "
                          f"compressed-tensors, which takes a scheme per layer")
    mapping = {}
    for name, m in src.modules.items():
        out_f, in_f = m.shape
        pf = 32 // m.scheme.bits
        if in_f % pf or out_f % pf:
            raise ExportError(f"cannot export {src.path} to {TARGET}: layer {name} has shape {[out_f, in_f]}; GPTQ "
                              f"packs {pf} codes per int32 along both dimensions, so both must be multiples of {pf}")
        mapping[name] = {"source_scheme": m.scheme.name, "bits": m.scheme.bits,
                         "group_size": m.scheme.group_size or -1, "zero_point": 1 << (m.scheme.bits - 1),
                         "tensors": [f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")]
                         + ([f"{name}.bias"] if m.bias is not None else [])}
    return mapping


def _pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes along `dim` (0: rows, 1: columns), 32/bits per int32, first code in the low bits."""
    pf = 32 // bits
    v = values.to(torch.int64)
    v = v.reshape(v.shape[0] // pf, pf, v.shape[1]) if dim == 0 else v.reshape(v.shape[0], v.shape[1] // pf, pf)
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    words = (v << (shifts.view(1, pf, 1) if dim == 0 else shifts.view(1, 1, pf))).sum(dim=dim + 1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement of the 32-bit pattern


def _module_tensors(m) -> dict[str, torch.Tensor]:
    s = m.scheme
    out_f, in_f = m.shape
    n_groups = in_f // s.group_size if s.granularity == "group" else 1
    group = s.group_size if s.granularity == "group" else in_f
    zero = torch.full((n_groups, out_f), (1 << (s.bits - 1)) - 1, dtype=torch.int64)  # v1 stores zero - 1
    return {
        "qweight": _pack_int32(m.codes.t().contiguous(), s.bits, dim=0),  # (in / pf, out)
        "qzeros": _pack_int32(zero, s.bits, dim=1),  # (n_groups, out / pf)
        "scales": m.scales.to(torch.float16).reshape(out_f, n_groups).t().contiguous(),  # (n_groups, out)
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // group).contiguous(),
    }


def quantize_config(src: SourceArtifact, mapping: dict) -> dict:
    first = next(iter(mapping.values()))
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": first["bits"],
            "group_size": first["group_size"], "desc_act": False, "sym": True, "static_groups": False,
            "true_sequential": True, "lm_head": "lm_head" in mapping, "damp_percent": 0.01,
            "meta": {"quantizer": ["quantship"], "source_scheme": first["source_scheme"],
                     "source_method": src.manifest["method"]["name"]}}


def write(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    from safetensors.torch import save_file

    state = module_state(src, _module_tensors)
    config = dict(src.config)
    if config.get("tie_word_embeddings") and any(k.rpartition(".")[0] in src.modules for k in src.tied):
        config["tie_word_embeddings"] = False
        for key, target in src.tied.items():
            if key.rpartition(".")[0] not in src.modules:
                state[key] = state[target].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(src, tmp, skip=("config.json",))
    qc = quantize_config(src, mapping)
    config["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
    return {"quantize_config": qc}


def read_gptq_v1(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense weights (out, in) of every GPTQ layer of a v1 checkpoint, dequantized as AutoGPTQ's reference
    QuantLinear does (shift-and-mask unpacking, zeros + 1), with the scales cast to `dtype` first."""
    from safetensors.torch import load_file

    folder = Path(folder)
    qc = json.loads((folder / "quantize_config.json").read_text())
    bits = qc["bits"]
    pf = 32 // bits
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qweight, qzeros = state[key], state[f"{name}.qzeros"]
        scales, g_idx = state[f"{name}.scales"].to(dtype), state[f"{name}.g_idx"].long()
        zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, pf), wf.view(1, 1, -1))
        zeros = torch.bitwise_and(zeros + 1, (1 << bits) - 1).reshape(scales.shape)  # (G, out)
        weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, pf, -1), wf.view(1, -1, 1))
        weight = torch.bitwise_and(weight, (1 << bits) - 1).reshape(-1, qweight.shape[1])  # (in, out)
        out[name] = (scales[g_idx] * (weight - zeros[g_idx]).to(dtype)).t().contiguous()
    return out


def verify(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    """Read the files back with read_gptq_v1: each weight equals quantship's bit for bit; then the dense
    model built from the export's config.json with those weights gives quantship's logits (KLD < 1e-4)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    dense = read_gptq_v1(tmp)
    records = [compare_weights(f"{name}.weight", dense[name], m.dequantize()) if name in dense
               else {"tensor": f"{name}.weight", "bit_exact": False, "why": "missing"}
               for name, m in src.modules.items()]
    weights = weight_check_summary(records, "read_gptq_v1 (AutoGPTQ v1 reference dequantization, re-implemented)")
    config = AutoConfig.from_pretrained(tmp)
    if hasattr(config, "quantization_config"):  # a plain float model: the weights are already dense
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in load_file(str(tmp / "model.safetensors")).items()
             if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    state.update({f"{name}.weight": w for name, w in dense.items()})
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in src.tied and "rotary" not in k]
    model.tie_weights()
    model.eval()
    ids = check_ids(src.tokenizer)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[0].float()
    ours = quantship_logits(src, ids)
    kld = kld_mean(ours, theirs)
    passed = weights["bit_exact"] and kld < KLD_LIMIT and not missing and not result.unexpected_keys
    why = None
    if not weights["bit_exact"]:
        why = f"weights differ from quantship's ({', '.join(weights['mismatched'][:5])})"
    elif missing or result.unexpected_keys:
        why = f"tensors do not fit the config (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
    elif kld >= KLD_LIMIT:
        why = f"logits differ from quantship's: KLD {kld:.3g} >= {KLD_LIMIT:g}"
    return {"passed": passed, "why": why, "weights": weights,
            "logits": {"runtime": "transformers dense model with the read-back weights (CPU)",
                       "tokens": int(ids.shape[1]), "kld_mean": kld, "limit": KLD_LIMIT,
                       "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())},
            "seconds": round(time.perf_counter() - started, 3),
            "summary": (f"{weights['weights_compared']} quantized weights bit-exact through {weights['reader']}; "
                        f"logits KLD {kld:.2e} over {ids.shape[1]} tokens")}


register_writer(Writer(TARGET, plan, write, verify, "AutoGPTQ / GPTQModel v1 checkpoint (vLLM, transformers)"))
