"""Architecture facts as data: where the decoder blocks are and which module feeds which linears.

Each `ScaleGroup` says: the output of `prev` (a norm or a linear inside the block) is the
input of every module in `linears`. Transforms that rescale input channels (AWQ,
SmoothQuant) divide `prev`'s output channels by s and multiply the linears' input columns
by s; the linears in one group also share their calibration input (one Hessian for GPTQ).
Adding a model family means adding one entry to ARCHITECTURES, keyed by config.model_type.
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
class ArchFacts:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[ScaleGroup, ...]  # in forward order
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    conv1d: bool = False  # GPT-2 stores Linear weights transposed (transformers Conv1D)
    # the block's residual branches in forward order; empty: the block is only run as a whole
    # (OPT's MLP is not a submodule). Checked against the real block before use.
    branches: tuple[Branch, ...] = ()
    extra: dict = field(default_factory=dict)

    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears) + tuple(self.extra.get("unfed", ()))


def _attention_and_mlp(attn_norm: str, mlp_norm: str, attn: str = "self_attn", o_proj: str = "o_proj",
                       down_proj: str = "down_proj", post_norms: tuple[str | None, str | None] = (None, None)):
    return (Branch(attn, attn_norm, f"{attn}.{o_proj}", post_norms[0]),
            Branch("mlp", mlp_norm, f"mlp.{down_proj}", post_norms[1], takes_block_kwargs=False))


def _llama_like(mlp_norm: str, norm_weight_offset: float = 0.0, post_norms=(None, None)) -> ArchFacts:
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
    )


_LLAMA = _llama_like("post_attention_layernorm")
_GEMMA3 = _llama_like("pre_feedforward_layernorm", norm_weight_offset=1.0,
                      post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))

_PHI3 = ArchFacts(
    blocks="model.layers",
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    # o_proj and down_proj have no foldable predecessor (fused qkv / gated activation).
    extra={"unfed": ("self_attn.o_proj", "mlp.down_proj")},
    branches=_attention_and_mlp("input_layernorm", "post_attention_layernorm"),
)

_GPT2 = ArchFacts(
    blocks="transformer.h",
    groups=(
        ScaleGroup("ln_1", ("attn.c_attn",)),
        ScaleGroup("ln_2", ("mlp.c_fc",)),
    ),
    conv1d=True,
    extra={"unfed": ("attn.c_proj", "mlp.c_proj")},
    branches=_attention_and_mlp("ln_1", "ln_2", attn="attn", o_proj="c_proj", down_proj="c_proj"),
)

_OPT = ArchFacts(
    blocks="model.decoder.layers",
    groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "linear"),
        ScaleGroup("final_layer_norm", ("fc1",)),
        ScaleGroup("fc1", ("fc2",), "linear"),  # ReLU is positively homogeneous: scales pass through
    ),
)

ARCHITECTURES: dict[str, ArchFacts] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
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
