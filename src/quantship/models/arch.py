"""Architecture facts as data: where the decoder blocks are and which module feeds which linears.

Each `ScaleGroup` says: the output of `prev` (a norm or a linear inside the block) is the
input of every module in `linears`. Transforms that rescale input channels (AWQ,
SmoothQuant) divide `prev`'s output channels by s and multiply the linears' input columns
by s; the linears in one group also share their calibration input (one Hessian for GPTQ).

The same entry is read by the quantizer (blocks, groups, branches, `conv1d`), the engine
(`engine`: how engine/forward.py runs the family; the projections and norms it calls are the
groups' and branches' module names) and the memory planner (`shape`: what bench/plan.py counts
from a config.json alone). Adding a model family means adding one entry to ARCHITECTURES, keyed
by config.model_type.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module path relative to the block, e.g. "input_layernorm"
    linears: tuple[str, ...]  # modules fed by prev's output
    prev_kind: str = "norm"  # "norm" (scale its weight/bias) or "linear" (scale its output rows)

    def __post_init__(self) -> None:
        if self.prev_kind not in ("norm", "linear"):
            raise ValueError(f"prev_kind must be 'norm' or 'linear', got {self.prev_kind!r}")


@dataclass(frozen=True)
class Branch:
    """One residual branch of a pre-norm decoder block: h = h + post(body(pre(h))).

    `tail` is the body's last linear (its output IS the body's output), so a branch can be
    finished from the tail's cached input instead of re-running the body (methods/block_runner.py)."""

    body: str  # e.g. "self_attn" (called with the block's keyword arguments) or "mlp" (input only)
    pre_norm: str
    tail: str  # e.g. "self_attn.o_proj"
    post_norm: str | None = None  # Gemma 3 normalises the branch output before the residual add
    takes_block_kwargs: bool = True  # attention needs masks / rotary embeddings; MLPs take the input only


@dataclass(frozen=True)
class EngineFacts:
    """How engine/forward.py runs a family whose entry has branches (attention, then MLP), an
    attention fed by three linears (q, k, v) and a gated MLP fed by two (gate, up).

    Paths of `embed`, `rotary`, `final_norm` and `head` are relative to the model; the embedding
    module applies any scaling itself (Gemma's multiplies by sqrt(hidden_size)). Per-family math
    that is not a module comes from the config: `config.layer_types` + `config.sliding_window`
    (windowed layers), `final_logit_softcapping`. transformers' Gemma 3 attention does not read
    `attn_logit_softcapping` (Gemma 2's did); the engine follows it."""

    embed: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    rope_per_layer_type: bool = False  # Gemma 3: rotary(x, positions, layer_type), one rope base per type
    layer_windows: bool = False  # config.layer_types marks "sliding_attention" layers (window masks)
    # None: the native decode op (native/csrc/decode_layer.cpp) computes this family; else why it cannot
    native_decode_unsupported: str | None = None


@dataclass(frozen=True)
class ShapeFacts:
    """What the memory planner (bench/plan.py) needs beyond the config's hyperparameters."""

    gated_mlp: bool = True  # gate + up + down; False: fc1 + down
    layernorm: bool = False  # LayerNorm (weight + bias); False: RMSNorm (weight only)
    all_biases: bool = False  # a bias on every linear (gpt2, opt)
    qkv_bias: bool = False  # a bias on q, k, v only (qwen2)
    position_keys: tuple[str, ...] = ()  # config keys of the learned position table's length (gpt2, opt)
    position_default: int = 0  # its length when the config has none of them
    position_offset: int = 0  # extra rows of that table (OPT offsets positions by 2)
    embed_dim_key: str | None = None  # config key of an embedding width other than hidden (OPT)


@dataclass(frozen=True)
class ArchFacts:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[ScaleGroup, ...]  # in forward order
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    # GPT-2 stores the blocks' linears as transformers Conv1D: weight (in, out), transposed
    conv1d: bool = False
    # the block's residual branches in forward order; empty: the block is only run as a whole
    # (OPT's MLP is not a submodule). Checked against the real block before use.
    branches: tuple[Branch, ...] = ()
    qk_norm: tuple[str, str] | None = None  # per-head norms of q and k before rope (qwen3, gemma3)
    engine: EngineFacts | None = None  # None: the engine has no forward for this family
    shape: ShapeFacts = ShapeFacts()
    extra: dict = field(default_factory=dict)

    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears) + tuple(self.extra.get("unfed", ()))

    def fed_by(self, prev: str) -> tuple[str, ...]:
        """The linears whose input is `prev`'s output (one ScaleGroup)."""
        for g in self.groups:
            if g.prev == prev:
                return g.linears
        raise KeyError(f"no group is fed by {prev!r}")

    def norms(self) -> tuple[str, ...]:
        """The hidden-sized norms of one block, in forward order."""
        names = [n for b in self.branches for n in (b.pre_norm, b.post_norm) if n] if self.branches else \
            [g.prev for g in self.groups if g.prev_kind == "norm"]
        return tuple(dict.fromkeys(names))

    def linear_types(self) -> tuple[type, ...]:
        """Module types that are the blocks' linears (quantization targets)."""
        from torch import nn

        return (nn.Linear, _conv1d_type()) if self.conv1d else (nn.Linear,)


def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_transposed(module) -> bool:
    """True when `module` stores its weight (in, out): transformers' Conv1D, the linear type of the
    entries with conv1d=True. The one place that tells the two weight layouts apart."""
    return isinstance(module, _conv1d_type())


def _attention_and_mlp(attn_norm: str, mlp_norm: str, attn: str = "self_attn", o_proj: str = "o_proj",
                       down_proj: str = "down_proj", post_norms: tuple[str | None, str | None] = (None, None)):
    return (Branch(attn, attn_norm, f"{attn}.{o_proj}", post_norms[0]),
            Branch("mlp", mlp_norm, f"mlp.{down_proj}", post_norms[1], takes_block_kwargs=False))


def _llama_like(mlp_norm: str, norm_weight_offset: float = 0.0, post_norms=(None, None), qk_norm: bool = False,
                engine: EngineFacts = EngineFacts(), shape: ShapeFacts = ShapeFacts()) -> ArchFacts:
    # llama/mistral/qwen: the MLP's norm is post_attention_layernorm; Gemma 3 has an extra
    # post-attention norm on the residual branch and feeds the MLP from pre_feedforward_layernorm.
    return ArchFacts(
        blocks="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
        ),
        norm_weight_offset=norm_weight_offset,
        branches=_attention_and_mlp("input_layernorm", mlp_norm, post_norms=post_norms),
        qk_norm=("self_attn.q_norm", "self_attn.k_norm") if qk_norm else None,
        engine=engine,
        shape=shape,
    )


_LLAMA = _llama_like("post_attention_layernorm")
_QWEN2 = _llama_like("post_attention_layernorm", shape=ShapeFacts(qkv_bias=True))
_QWEN3 = _llama_like("post_attention_layernorm", qk_norm=True)
_GEMMA3 = _llama_like(
    "pre_feedforward_layernorm", norm_weight_offset=1.0, qk_norm=True,
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    engine=EngineFacts(rope_per_layer_type=True, layer_windows=True, native_decode_unsupported=(
        "gemma3 layers (post-attention and post-feedforward norms, GELU-tanh MLP, sliding-window layers) "
        "have no native decode form")))

_PHI3 = ArchFacts(
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    # o_proj and down_proj have no foldable predecessor (fused qkv / gated activation).
    extra={"unfed": ("self_attn.o_proj", "mlp.down_proj")},
    branches=_attention_and_mlp("input_layernorm", "post_attention_layernorm"),
)  # no engine forward: its q, k, v (and gate, up) are one fused linear each

_GPT2 = ArchFacts(
    blocks="transformer.h",
    groups=(
        ScaleGroup("ln_1", ("attn.c_attn",)),
        ScaleGroup("ln_2", ("mlp.c_fc",)),
    ),
    conv1d=True,
    extra={"unfed": ("attn.c_proj", "mlp.c_proj")},
    branches=_attention_and_mlp("ln_1", "ln_2", attn="attn", o_proj="c_proj", down_proj="c_proj"),
    shape=ShapeFacts(gated_mlp=False, layernorm=True, all_biases=True, position_keys=("n_positions",
                     "max_position_embeddings"), position_default=1024),
)  # no engine forward: learned positions, fused c_attn, LayerNorm

_OPT = ArchFacts(
    blocks="model.decoder.layers",
    groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        ScaleGroup("final_layer_norm", ("fc1",)),
        ScaleGroup("fc1", ("fc2",), "linear"),  # ReLU is positively homogeneous: scales pass through
    ),
    shape=ShapeFacts(gated_mlp=False, layernorm=True, all_biases=True, position_keys=("max_position_embeddings",),
                     position_default=2048, position_offset=2, embed_dim_key="word_embed_proj_dim"),
)  # no engine forward: learned positions, LayerNorm, ReLU MLP

ARCHITECTURES: dict[str, ArchFacts] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _QWEN2,
    "qwen3": _QWEN3,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "opt": _OPT,
}


def arch_facts(model_type: str) -> ArchFacts:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"quantship has no architecture facts for model_type {model_type!r}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add one, add an ArchFacts entry to "
            f"ARCHITECTURES in quantship/models/arch.py (decoder block path and norm -> linears groups)."
        ) from None


def engine_facts(model_type: str) -> tuple[ArchFacts, EngineFacts]:
    """-> the entry and its engine facts; ValueError naming the families the engine runs."""
    facts = arch_facts(model_type)
    if facts.engine is None:
        runs = sorted(k for k, f in ARCHITECTURES.items() if f.engine is not None)
        raise ValueError(f"the engine has no forward for model_type {model_type!r} (its ARCHITECTURES entry has "
                         f"no engine facts); the engine runs: {', '.join(runs)} (use transformers generate() "
                         f"for others)")
    return facts, facts.engine
