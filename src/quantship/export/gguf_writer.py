"""GGUF export (llama.cpp) for llama-architecture models, written with the `gguf` package.

Exact mappings (docs/export.md), one GGUF block = 32 consecutive weights of a row:
    w4g{32k}, w4       -> Q4_0: value = (q - 8) * d             quantship: (q - 8) * s, s fp16
    w4g{32k}-asym, w4-asym -> Q4_1: value = q * d + m           quantship: q * s + o, s and o fp16
    w8g{32k}, w8       -> Q8_0: value = int8 * d                quantship: (q - 128) * s = int8(byte) * s
A group of 32k weights (or a whole row) shares one scale, so each of its k blocks repeats it:
still exact, stored at the GGUF type's 32-weight block size. The nibble order of Q4_0/Q4_1 is
llama.cpp's: byte j holds weight j (low nibble) and weight j + 16 (high nibble).
quantship's negative symmetric scales are what llama.cpp's own Q4_0/Q8_0 quantizers write (the
signed extreme on the lowest code). Float tensors are F32. attn_q / attn_k rows are permuted as
llama.cpp's convert_hf_to_gguf.py does (rotary halves interleaved); the permutation moves whole
rows, so quantized rows move with their scales and stay exact.
Refused: other architectures, nf4, fp8, w8a8, 2/3/5/6/7 bits, groups not a multiple of 32, -asym at 8 bits.
The tokenizer (tokens, merges, special ids, chat template) is embedded from the artifact's
tokenizer files; llama.cpp's pre-tokenizer name is read from the source GGUF of a built-in model.
Verified by reading the file back with gguf's GGUFReader and dequantizing with gguf.quants.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from . import Writer, register_writer
from .base import ExportError, SourceArtifact, compare_weights, library_version, refuse_unmappable, weight_check_summary

TARGET = "gguf"
GGUF_FILE = "model.gguf"
BLOCK = 32
ARCHITECTURES = ("llama",)

_HF_TO_GGUF = {  # per block i
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _qtype_name(s) -> str | None:
    if s.kind != "int" or s.act_bits:
        return None
    if s.granularity == "tensor" or (s.granularity == "group" and s.group_size % BLOCK):
        return None
    if s.bits == 4:
        return "Q4_0" if s.symmetric else "Q4_1"
    if s.bits == 8 and s.symmetric:
        return "Q8_0"
    return None


def _reason(m) -> str | None:
    s = m.scheme
    if _qtype_name(s):
        return None
    if s.kind == "nf4":
        return "GGUF has no NormalFloat-4 type (IQ4_NL's codebook differs)"
    if s.kind == "fp8":
        return "GGUF has no float8 E4M3 weight type"
    if s.act_bits:
        return "llama.cpp quantizes activations its own way; w8a8's per-token int8 activations have no GGUF form"
    if s.granularity == "tensor":
        return "GGUF's Q4_0/Q4_1/Q8_0 have a scale per 32 weights; one scale per tensor would be re-quantized"
    if s.granularity == "group" and s.group_size % BLOCK:
        return f"GGUF blocks hold 32 weights; a group of {s.group_size} does not split into whole blocks"
    if s.bits == 8:
        return "GGUF's 8-bit type Q8_0 is symmetric (no minimum); quantship's w8 -asym has one"
    return f"GGUF's legacy types Q4_0/Q4_1/Q8_0 hold 4 or 8 bits; {s.bits}-bit codes would be re-quantized"


def _gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        rel = ".".join(parts[3:-1])
        if rel in _HF_TO_GGUF:
            return f"blk.{parts[2]}.{_HF_TO_GGUF[rel]}.{parts[-1]}"
    return None


def plan(src: SourceArtifact) -> dict:
    arch = src.config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ExportError(f"cannot export {src.path} to {TARGET}: the writer handles the llama architecture "
                          f"(SmolLM2, Llama); this model is {arch!r}")
    refuse_unmappable(TARGET, src, _reason)
    mapping = {}
    for name, m in src.modules.items():
        gname = _gguf_name(f"{name}.weight")
        if gname is None:
            raise ExportError(f"cannot export {src.path} to {TARGET}: layer {name} has no llama.cpp tensor name")
        group = m.scheme.group_size or m.shape[1]
        mapping[name] = {"source_scheme": m.scheme.name, "gguf_tensor": gname, "type": _qtype_name(m.scheme),
                         "blocks_per_scale": group // BLOCK, "permuted": gname.split(".")[-2] in ("attn_q", "attn_k")}
    for key in src.float_tensors:
        if _gguf_name(key) is None:
            raise ExportError(f"cannot export {src.path} to {TARGET}: tensor {key} has no llama.cpp tensor name")
    return mapping


def permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the output rows (rotary halves -> interleaved pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _heads(config: dict, gname: str) -> tuple[int, int | None] | None:
    kind = gname.split(".")[-2]
    n_head = config["num_attention_heads"]
    if kind == "attn_q":
        return n_head, n_head
    if kind == "attn_k":
        return n_head, config.get("num_key_value_heads", n_head)
    return None


def _blocks(m, qtype: str) -> np.ndarray:
    """(out, in) codes + scales (+ offsets) -> (out, in/32 * block bytes) uint8 GGUF blocks."""
    out_f, in_f = m.shape
    nb = in_f // BLOCK
    reps = (m.scheme.group_size or in_f) // BLOCK
    d = m.scales.to(torch.float16).reshape(out_f, -1).repeat_interleave(reps, dim=1)  # (out, nb)
    d_bytes = d.contiguous().view(torch.uint8).reshape(out_f, nb, 2)
    codes = m.codes.reshape(out_f, nb, BLOCK)
    if qtype == "Q8_0":
        qs = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
        blocks = torch.cat([d_bytes, qs], dim=2)
    else:
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        parts = [d_bytes]
        if qtype == "Q4_1":
            o = m.offsets.to(torch.float16).reshape(out_f, -1).repeat_interleave(reps, dim=1)
            parts.append(o.contiguous().view(torch.uint8).reshape(out_f, nb, 2))
        blocks = torch.cat(parts + [qs], dim=2)
    return blocks.reshape(out_f, -1).numpy()


def _permute_module(m, heads):
    """A copy of the module's codes/scales/offsets with rows permuted as llama.cpp expects."""
    from dataclasses import replace

    def p(t):
        return None if t is None else permute_rows(t.reshape(m.shape[0], -1), *heads).contiguous()

    return replace(m, codes=p(m.codes), scales=p(m.scales), offsets=p(m.offsets))


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _source_gguf_tokenizer(src: SourceArtifact) -> dict:
    """tokenizer.ggml.pre (and add_bos) from the built-in model's source GGUF, when it is installed."""
    import importlib.util

    import gguf

    from ..models.builtin import BUILTINS

    builtin = BUILTINS.get(src.manifest["source"].get("name"))
    if builtin is None:
        return {}
    spec = importlib.util.find_spec(builtin.module)
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_name
    if not path.is_file():
        return {}
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"):
        if key in reader.fields:
            out[key] = reader.fields[key].contents()
    return out


def _add_tokenizer(writer, src: SourceArtifact) -> dict:
    import gguf

    tok = json.loads((src.path / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"cannot export {src.path} to {TARGET}: the writer embeds byte-level BPE tokenizers "
                          f"(llama.cpp 'gpt2' model); this tokenizer is {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = src.config.get("vocab_size", len(vocab))
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            t = by_id[i]
            tokens.append(t)
            a = added.get(t)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    from_source = _source_gguf_tokenizer(src)
    pre = from_source.get("tokenizer.ggml.pre") or _pre_tokenizer(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src.path, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)
    if "tokenizer.ggml.add_bos_token" in from_source and special.add_special_token.get("bos") is None:
        writer.add_add_bos_token(bool(from_source["tokenizer.ggml.add_bos_token"]))
    return {"tokenizer": {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
                          "chat_template": special.chat_template is not None}}


def _pre_tokenizer(tok: dict) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ExportError("cannot tell llama.cpp's pre-tokenizer for this tokenizer (its pre_tokenizer is "
                      f"{pre.get('type')!r}, not plain GPT-2 byte-level); the GGUF would tokenize differently")


def write(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    import gguf

    c = src.config
    writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), "llama")
    writer.add_name(str(src.manifest["source"].get("name") or src.path.name))
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    writer.add_vocab_size(c["vocab_size"])
    types = {e["type"] for e in mapping.values()}
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(ftype[types.pop()] if len(types) == 1 else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = _add_tokenizer(writer, src)
    for key, t in src.float_tensors.items():
        gname = _gguf_name(key)
        arr = t.float()
        heads = _heads(c, gname)
        if heads:
            arr = permute_rows(arr, *heads)
        writer.add_tensor(gname, arr.contiguous().numpy())
    for name, m in src.modules.items():
        entry = mapping[name]
        heads = _heads(c, entry["gguf_tensor"])
        mm = _permute_module(m, heads) if heads else m
        writer.add_tensor(entry["gguf_tensor"], _blocks(mm, entry["type"]),
                          raw_dtype=getattr(gguf.GGMLQuantizationType, entry["type"]))
        if m.bias is not None:
            writer.add_tensor(entry["gguf_tensor"].replace(".weight", ".bias"), m.bias.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return extra


def verify(src: SourceArtifact, tmp: Path, mapping: dict) -> dict:
    """Read model.gguf back with gguf.GGUFReader, dequantize each tensor with gguf.quants, undo the Q/K
    permutation: every quantized weight equals quantship's dequantized weight bit for bit, every float
    tensor its source; the metadata names the tokenizer and chat template."""
    import gguf
    from gguf.quants import dequantize

    started = time.perf_counter()
    reader = gguf.GGUFReader(str(tmp / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    records = []

    def read(gname: str, shape) -> torch.Tensor | None:
        t = tensors.get(gname)
        if t is None:
            return None
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        heads = _heads(src.config, gname)
        return unpermute_rows(w, *heads) if heads else w

    for name, m in src.modules.items():
        entry = mapping[name]
        t = tensors.get(entry["gguf_tensor"])
        if t is None or t.tensor_type.name != entry["type"]:
            records.append({"tensor": entry["gguf_tensor"], "bit_exact": False, "why": "missing or wrong type"})
            continue
        records.append(compare_weights(entry["gguf_tensor"], read(entry["gguf_tensor"], m.shape), m.dequantize()))
    for key, t in src.float_tensors.items():
        got = read(_gguf_name(key), tuple(t.shape))
        records.append(compare_weights(_gguf_name(key), got, t.float()) if got is not None
                       else {"tensor": _gguf_name(key), "bit_exact": False, "why": "missing"})
    weights = weight_check_summary(records, f"gguf {library_version('gguf')} GGUFReader + gguf.quants.dequantize")
    fields = reader.fields
    has_template = "tokenizer.chat_template" in fields
    wants_template = (src.path / "chat_template.jinja").is_file()
    n_tokens = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0
    hf = _transformers_check(src, tmp)
    passed = (weights["bit_exact"] and hf["weights"]["bit_exact"] and hf["logits"]["kld_mean"] < KLD_LIMIT
              and n_tokens == src.config["vocab_size"] and has_template == wants_template)
    why = None
    if not weights["bit_exact"]:
        why = f"tensors differ from quantship's ({', '.join(weights['mismatched'][:5])})"
    elif not hf["weights"]["bit_exact"]:
        why = f"transformers' GGUF loader reads other weights ({', '.join(hf['weights']['mismatched'][:5])})"
    elif hf["logits"]["kld_mean"] >= KLD_LIMIT:
        why = f"transformers' GGUF load gives other logits: KLD {hf['logits']['kld_mean']:.3g}"
    elif not passed:
        why = f"tokenizer metadata incomplete ({n_tokens} tokens, chat template {has_template})"
    return {"passed": passed, "why": why, "weights": weights, "transformers_gguf": hf, "tokens": n_tokens,
            "chat_template": has_template, "seconds": round(time.perf_counter() - started, 3),
            "summary": (f"{weights['weights_compared']} tensors bit-exact through {weights['reader']}; "
                        f"{hf['weights']['weights_compared']} through transformers' GGUF loader (which undoes "
                        f"the Q/K permutation itself), logits KLD {hf['logits']['kld_mean']:.2e}")}


KLD_LIMIT = 1e-4


def _transformers_check(src: SourceArtifact, tmp: Path) -> dict:
    """A second, independent reader: transformers loads the GGUF (names, metadata, its own inverse of the
    Q/K permutation, gguf.quants dequantization) into a float model; weights and logits must match."""
    from transformers import AutoModelForCausalLM

    from .base import check_ids, kld_mean, quantship_logits

    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.eval()
    records = [compare_weights(f"{name}.weight", model.get_submodule(name).weight.detach(), m.dequantize())
               for name, m in src.modules.items()]
    weights = weight_check_summary(records, f"transformers {library_version('transformers')} (GGUF)")
    ids = check_ids(src.tokenizer)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[0].float()
    ours = quantship_logits(src, ids)
    return {"weights": weights, "logits": {"tokens": int(ids.shape[1]), "kld_mean": kld_mean(ours, theirs),
                                           "limit": KLD_LIMIT}}


register_writer(Writer(TARGET, plan, write, verify, "llama.cpp GGUF (Q4_0, Q4_1, Q8_0; llama architecture)"))
