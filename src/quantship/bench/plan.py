"""Memory planner: will this model, at this scheme, fit this memory — and how many sequences?

Everything is computed from a Hugging Face `config.json` (no weights needed):

    parameters   counted per component from the hyperparameters (embeddings, attention with GQA,
                 MLP gated or not, norms, lm_head tied or not)
    weights      each linear inside the decoder layers at the scheme's bits per weight (codes +
                 scales, `Scheme.storage_bits`); embeddings, lm_head, norms and biases at the
                 source precision (bf16 unless told) — lm_head quantized too with quantize_head
    KV cache     per token = layers x kv_heads x head_dim x 2 (K and V) x bytes per element;
                 int8/fp8 add one fp32 scale per token per head for K and for V
    activations  the transient peak of one step (formula in `activation_bytes`)
    reserve      a fixed fraction of the budget kept free (runtime, allocator fragmentation),
                 as vLLM's gpu_memory_utilization=0.9 does

and the largest batch that fits at the requested context follows:
    batch = floor((budget - reserve - weights - prefill activations) / (ctx x KV/token + logits/seq)).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..formats.scheme import GRAMMAR, parse_scheme
from ..models.arch import ARCHITECTURES

CONFIG_DIR = Path(__file__).with_name("configs")

FLOAT_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
KV_BYTES = {"float32": 4, "fp32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1, "fp8": 1}
KV_SCALE_BYTES = 4  # int8/fp8 KV: one fp32 scale per token per kv head, for K and for V
RESERVE_FRACTION = 0.10  # of the budget, kept free (vLLM's default gpu_memory_utilization is 0.9)

# Total memory as nvidia-smi reports it (MiB), so a preset is what the device really has.
GPU_PRESETS = {
    "h100-80gb": 81559 * 2**20,
    "a100-80gb": 81920 * 2**20,
    "a100-40gb": 40960 * 2**20,
    "l4-24gb": 23034 * 2**20,
    "rtx4090-24gb": 24564 * 2**20,
}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEM_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


def parse_memory(text: str | int) -> int:
    """'24GiB', '80GB', '500MiB', '1.5 TB', a preset name ('h100-80gb') or a byte count -> bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"memory must be positive, got {text} bytes")
        return text
    key = str(text).strip().lower()
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    m = _MEM_RE.match(key)
    if not m or m["unit"] not in _UNITS:
        raise ValueError(
            f"cannot read memory {text!r}: write a number with a unit (B, KB, MB, GB, TB are powers of 1000; "
            f"KiB, MiB, GiB, TiB powers of 1024), e.g. 24GiB, 80GB, 500MiB, or a preset: {', '.join(GPU_PRESETS)}"
        )
    value = int(float(m["num"]) * _UNITS[m["unit"]])
    if value <= 0:
        raise ValueError(f"memory must be positive, got {text!r}")
    return value


# ----- model shape from a config -----------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    component: str  # "attention" | "mlp" | "projection"
    name: str
    out_features: int
    in_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a decoder-only transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool
    tied_embeddings: bool
    norms_per_layer: int  # hidden-sized norms in each layer
    norm_bias: bool  # LayerNorm (weight + bias) vs RMSNorm (weight)
    qk_norm: bool  # qwen3 / gemma3: a head_dim-sized norm on q and on k
    attention_bias: bool  # bias on q, k, v (qwen2, gpt2, opt)
    out_bias: bool  # bias on the attention output projection
    mlp_bias: bool
    positions: int  # learned position embeddings (gpt2, opt); 0 with rotary
    embed_dim: int = 0  # OPT word_embed_proj_dim when it differs from hidden_size (else 0)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    def linears(self) -> list[Linear]:
        """The linears of ONE decoder layer (fused qkv / gate_up count the same as separate ones)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        ab = self.attention_bias
        out = [Linear("attention", "q_proj", q, h, ab), Linear("attention", "k_proj", kv, h, ab),
               Linear("attention", "v_proj", kv, h, ab), Linear("attention", "o_proj", h, q, self.out_bias)]
        i, mb = self.intermediate_size, self.mlp_bias
        if self.gated_mlp:
            out += [Linear("mlp", "gate_proj", i, h, mb), Linear("mlp", "up_proj", i, h, mb)]
        else:
            out += [Linear("mlp", "fc1", i, h, mb)]
        out.append(Linear("mlp", "down_proj", h, i, mb))
        return out

    def extra_linears(self) -> list[Linear]:
        """Linears outside the layers other than lm_head (OPT's project_in/out)."""
        if not self.embed_dim:
            return []
        return [Linear("projection", "project_in", self.hidden_size, self.embed_dim, False),
                Linear("projection", "project_out", self.embed_dim, self.hidden_size, False)]


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _need(cfg: dict, *keys) -> int:
    value = _first(cfg, *keys)
    if value is None:
        raise ValueError(f"config has none of {', '.join(keys)} (model_type {cfg.get('model_type')!r}); "
                         f"the planner reads llama/mistral/qwen2/qwen3/gemma3/phi3/gpt2/opt style configs")
    return int(value)


def shape_from_config(config: dict) -> ModelShape:
    """Read the hyperparameters of llama/mistral/qwen2/qwen3/gemma3/phi3/gpt2/opt style configs."""
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (gemma3): plan the language model
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "llama"))
    hidden = _need(cfg, "hidden_size", "n_embd", "d_model")
    heads = _need(cfg, "num_attention_heads", "n_head")
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    if model_type not in ARCHITECTURES:
        raise ValueError(f"the planner has no architecture facts for model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (add an entry to ARCHITECTURES in "
                         f"quantship/models/arch.py)")
    arch = ARCHITECTURES[model_type]
    facts = arch.shape
    embed_dim = int(_first(cfg, facts.embed_dim_key, default=hidden)) if facts.embed_dim_key else hidden
    positions = 0
    if facts.position_keys:
        positions = int(_first(cfg, *facts.position_keys, default=facts.position_default)) + facts.position_offset
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelShape(
        model_type=model_type,
        vocab_size=_need(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=_need(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        num_heads=heads,
        num_kv_heads=int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=head_dim,
        intermediate_size=int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        gated_mlp=facts.gated_mlp,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        norms_per_layer=len(arch.norms()),
        norm_bias=facts.layernorm,
        qk_norm=arch.qk_norm is not None,
        attention_bias=facts.all_biases or facts.qkv_bias or attention_bias,
        out_bias=facts.all_biases or (attention_bias and not facts.qkv_bias),
        mlp_bias=facts.all_biases or bool(cfg.get("mlp_bias", False)),
        positions=positions,
        embed_dim=embed_dim if embed_dim != hidden else 0,
    )


# ----- parameter count --------------------------------------------------------------------------
def _linear_params(lin: Linear) -> int:
    return lin.out_features * lin.in_features + (lin.out_features if lin.bias else 0)


def param_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters by component: embeddings, attention, mlp, norms, projection, lm_head (0 when tied)."""
    e = shape.embed_dim or shape.hidden_size
    per_norm = shape.hidden_size * (2 if shape.norm_bias else 1)
    layer = shape.linears()
    counts = {
        "embeddings": shape.vocab_size * e + shape.positions * shape.hidden_size,
        "attention": shape.num_layers * sum(_linear_params(l) for l in layer if l.component == "attention"),
        "mlp": shape.num_layers * sum(_linear_params(l) for l in layer if l.component == "mlp"),
        "norms": shape.num_layers * (shape.norms_per_layer * per_norm + (2 * shape.head_dim if shape.qk_norm else 0))
        + per_norm,  # + the final norm
        "projection": sum(_linear_params(l) for l in shape.extra_linears()),
        "lm_head": 0 if shape.tied_embeddings else shape.vocab_size * e,
    }
    return counts


# ----- bytes ------------------------------------------------------------------------------------
def linear_weight_bits(scheme: str, out_features: int, in_features: int) -> int:
    """Stored bits of one weight matrix under a scheme name (fp32/bf16/fp16 or a quantship scheme)."""
    key = scheme.strip().lower()
    if key in FLOAT_BYTES:
        return out_features * in_features * 8 * FLOAT_BYTES[key]
    try:
        s = parse_scheme(key)
    except ValueError as e:
        raise ValueError(f"{e}; or a float format: fp32, bf16, fp16") from e
    if s.group_size and in_features % s.group_size:
        raise ValueError(f"scheme {scheme!r}: group size {s.group_size} does not divide in_features={in_features} "
                         f"of a {out_features}x{in_features} linear; choose a group that divides it "
                         f"(e.g. {math.gcd(in_features, 128)}) or per-channel w{s.bits}")
    return s.storage_bits(out_features, in_features)


def weight_bytes(shape: ModelShape, scheme: str, *, source: str = "bf16", quantize_head: bool = False) -> dict[str, int]:
    """Bytes of stored weights by component under `scheme` (see the module docstring)."""
    if source.lower() not in FLOAT_BYTES:
        raise ValueError(f"unknown source precision {source!r}; valid: {', '.join(FLOAT_BYTES)}")
    src = FLOAT_BYTES[source.lower()]
    counts = param_counts(shape)
    out: dict[str, int] = {"embeddings": counts["embeddings"] * src, "norms": counts["norms"] * src}
    for component in ("attention", "mlp"):
        bits = sum(linear_weight_bits(scheme, l.out_features, l.in_features) + (l.out_features * 8 * src if l.bias else 0)
                   for l in shape.linears() if l.component == component)
        out[component] = shape.num_layers * bits // 8
    out["projection"] = sum(linear_weight_bits(scheme, l.out_features, l.in_features) for l in shape.extra_linears()) // 8
    e = shape.embed_dim or shape.hidden_size
    if quantize_head:  # a tied head becomes its own quantized copy; the embedding table stays
        out["lm_head"] = linear_weight_bits(scheme, shape.vocab_size, e) // 8
    else:
        out["lm_head"] = counts["lm_head"] * src
    return out


def kv_bytes_per_token(shape: ModelShape, kv: str = "bf16") -> int:
    """layers x kv_heads x head_dim x 2 (K, V) x bytes; int8/fp8 add an fp32 scale per token per head."""
    key = kv.strip().lower()
    if key not in KV_BYTES:
        raise ValueError(f"unknown KV cache type {kv!r}; valid: {', '.join(KV_BYTES)}")
    per_head = shape.head_dim * KV_BYTES[key] + (KV_SCALE_BYTES if KV_BYTES[key] == 1 else 0)
    return shape.num_layers * shape.num_kv_heads * per_head * 2


def activation_bytes(shape: ModelShape, *, prefill_tokens: int, batch: int, act_bytes: int = 2) -> int:
    """The transient peak of one step, assuming fused (flash/SDPA) attention and one prefill at a time:

        prefill_tokens x (4 x hidden + 2 x intermediate + q + 2 x kv widths) x act_bytes
          (residual, normed input, attention out, MLP gate/up outputs, q/k/v of the chunk)
        + batch x vocab x 4   (fp32 logits of the last position of each running sequence)
    """
    width = (4 * shape.hidden_size + 2 * shape.intermediate_size
             + (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim)
    return prefill_tokens * width * act_bytes + batch * shape.vocab_size * 4


# ----- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    model: str
    scheme: str
    kv: str
    ctx: int
    memory_bytes: int
    params: dict[str, int] = field(hash=False)
    weight_bytes: dict[str, int] = field(hash=False)
    kv_bytes_per_token: int = 0
    reserve_bytes: int = 0
    activation_bytes: int = 0  # at max_batch (or batch 1 when nothing fits)
    max_batch: int = 0  # sequences of `ctx` tokens that fit at once (0: not even one)
    max_ctx_batch1: int = 0  # longest context of a single sequence that fits
    shape: ModelShape | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.ctx < 1:
            raise ValueError(f"ctx must be >= 1, got {self.ctx}")
        if self.memory_bytes <= 0:
            raise ValueError(f"memory must be positive, got {self.memory_bytes}")

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def kv_bytes(self) -> int:
        return self.max_batch * self.ctx * self.kv_bytes_per_token

    @property
    def fits(self) -> bool:
        return self.max_batch >= 1

    def to_dict(self) -> dict:
        return {"model": self.model, "scheme": self.scheme, "kv": self.kv, "ctx": self.ctx,
                "memory_bytes": self.memory_bytes, "params": dict(self.params), "total_params": self.total_params,
                "weight_bytes": dict(self.weight_bytes), "total_weight_bytes": self.total_weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "reserve_bytes": self.reserve_bytes,
                "activation_bytes": self.activation_bytes, "max_batch": self.max_batch,
                "max_ctx_batch1": self.max_ctx_batch1, "fits": self.fits}


def load_config(config: dict | str | Path) -> tuple[str, dict]:
    """A dict, a config.json path, an HF folder, an example name (llama-2-7b) or a built-in model name."""
    if isinstance(config, dict):
        return str(config.get("_name_or_path") or config.get("model_type", "model")), config
    text = str(config)
    example = CONFIG_DIR / f"{text.lower()}.json"
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and example.is_file():
        path = example
    elif not path.exists():
        from ..models.builtin import BUILTINS

        if text in BUILTINS:
            from ..models.load import resolve_model

            path = resolve_model(text) / "config.json"
        else:
            raise FileNotFoundError(
                f"{text!r} is not a config.json, an HF folder, an example ({', '.join(example_names())}) "
                f"or a built-in model ({', '.join(BUILTINS)})"
            )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a config.json or a folder that has one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    name = text if path.parent == CONFIG_DIR else str(data.get("_name_or_path") or text)
    return name, data


def example_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _max_batch(usable: int, weights: int, shape: ModelShape, ctx: int, kv_tok: int, act: int) -> int:
    free = usable - weights - activation_bytes(shape, prefill_tokens=ctx, batch=0, act_bytes=act)
    per_seq = ctx * kv_tok + shape.vocab_size * 4
    return max(0, free // per_seq)


def _max_ctx_batch1(usable: int, weights: int, shape: ModelShape, kv_tok: int, act: int) -> int:
    per_token = kv_tok + activation_bytes(shape, prefill_tokens=1, batch=0, act_bytes=act)
    return max(0, (usable - weights - shape.vocab_size * 4) // per_token)


def plan(config: dict | str | Path, scheme: str, *, kv: str = "bf16", ctx: int = 4096, memory: str | int = "24GiB",
         quantize_head: bool = False, source: str = "bf16", reserve_fraction: float = RESERVE_FRACTION) -> Plan:
    """How `config` quantized with `scheme` fits `memory` at `ctx` tokens per sequence."""
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if ctx < 1:
        raise ValueError(f"ctx must be >= 1, got {ctx}")
    name, cfg = load_config(config)
    shape = shape_from_config(cfg)
    budget = parse_memory(memory)
    weights = weight_bytes(shape, scheme, source=source, quantize_head=quantize_head)
    kv_tok = kv_bytes_per_token(shape, kv)
    act = FLOAT_BYTES[source.lower()]
    reserve = int(budget * reserve_fraction)
    usable = budget - reserve
    total_w = sum(weights.values())
    batch = _max_batch(usable, total_w, shape, ctx, kv_tok, act)
    return Plan(model=name, scheme=scheme, kv=kv, ctx=ctx, memory_bytes=budget, params=param_counts(shape),
                weight_bytes=weights, kv_bytes_per_token=kv_tok, reserve_bytes=reserve,
                activation_bytes=activation_bytes(shape, prefill_tokens=ctx, batch=max(batch, 1), act_bytes=act),
                max_batch=batch, max_ctx_batch1=_max_ctx_batch1(usable, total_w, shape, kv_tok, act), shape=shape)


def cost_per_million_tokens(tok_s: float, price_per_hour: float) -> float:
    """Dollars (or the price's currency) per 1e6 generated tokens at a sustained tok/s."""
    if tok_s <= 0:
        raise ValueError(f"tok/s must be positive, got {tok_s}")
    if price_per_hour < 0:
        raise ValueError(f"price per hour must be >= 0, got {price_per_hour}")
    return price_per_hour / (tok_s * 3600.0) * 1e6


def render_plan(p: Plan):
    """A rich table of the plan."""
    from rich.table import Table

    from ..report import fmt_bytes

    table = Table(title=f"{p.model}: {p.scheme} weights, {p.kv} KV, ctx {p.ctx}, budget {fmt_bytes(p.memory_bytes)}",
                  header_style="bold")
    for col in ("component", "params", "bytes"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for comp, n in p.params.items():
        if n or p.weight_bytes.get(comp):
            table.add_row(comp, f"{n / 1e6:,.1f} M", fmt_bytes(p.weight_bytes.get(comp, 0)))
    table.add_row("[bold]weights[/bold]", f"{p.total_params / 1e9:.3f} B", f"[bold]{fmt_bytes(p.total_weight_bytes)}[/bold]")
    table.add_row("KV cache per token", "", fmt_bytes(p.kv_bytes_per_token))
    table.add_row(f"KV cache ({p.max_batch} x {p.ctx} tokens)", "", fmt_bytes(p.kv_bytes))
    table.add_row("activations (peak step)", "", fmt_bytes(p.activation_bytes))
    table.add_row(f"reserve ({p.reserve_bytes / p.memory_bytes:.0%} of budget)", "", fmt_bytes(p.reserve_bytes))
    verdict = (f"[green]max batch {p.max_batch} at ctx {p.ctx}[/green]" if p.fits
               else "[red]does not fit: not one sequence[/red]")
    table.add_row(verdict, "", f"batch-1 max ctx {p.max_ctx_batch1:,}")
    return table


# ----- what a running process holds -------------------------------------------------------------
# Memory a CPU process holds besides weights, KV cache and activations, measured on this machine
# (benchmarks/plan_vs_rss.py, SmolLM2-135M fp32): ~293 MiB right after importing Python + torch 2.13
# + transformers 5, plus ~250 MiB that does not grow with batch or context (the loader's mapped
# safetensors pages, allocator arenas, kernel scratch). Calibrated as the mean of peak RSS minus the
# modelled terms over 1x512, 4x512 and 16x256 (each case in a fresh process); it is a fixed cost,
# so it matters for small models and vanishes for 7B ones. On a GPU the analogue is the CUDA context.
CPU_RUNTIME_BYTES = 540 * 2**20


def predicted_peak_bytes(p: Plan, *, batch: int, prefill_tokens: int | None = None, engine_head_int8: bool = False,
                         runtime_bytes: int = CPU_RUNTIME_BYTES) -> dict[str, int]:
    """Peak resident bytes of a process serving `batch` sequences of p.ctx tokens with this plan:
    weights + KV(batch x ctx) + the step's activations (one prefill of `prefill_tokens`, default ctx)
    + the runtime itself. engine_head_int8: quantship's engine keeps an int8 copy of a float lm_head."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    shape = p.shape
    head = 0
    if engine_head_int8:
        head = linear_weight_bits("w8", shape.vocab_size, shape.embed_dim or shape.hidden_size) // 8
    out = {
        "weights": p.total_weight_bytes + head,
        "kv": batch * p.ctx * p.kv_bytes_per_token,
        "activations": activation_bytes(shape, prefill_tokens=prefill_tokens or p.ctx, batch=batch,
                                        act_bytes=FLOAT_BYTES.get(p.scheme.lower(), 2)),
        "runtime": runtime_bytes,
    }
    out["total"] = sum(out.values())
    return out
