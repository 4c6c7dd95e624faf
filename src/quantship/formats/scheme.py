"""Scheme names: how a weight is stored, parsed from a short string.

Grammar (documented in the README):
    w{bits}            integer, symmetric, one scale per output channel      (w8, w4)
    w{bits}g{group}    integer, symmetric, one scale per `group` input columns (w4g64)
    w{bits}pt          integer, symmetric, one scale for the whole tensor      (w8pt)
    ...-asym           asymmetric: a scale and an offset (min) per group/channel/tensor
    nf4g{group}        NormalFloat-4 codebook, absmax scale per group            (nf4g64)
    fp8                FP8 E4M3 values, one scale per output channel
    w8a8               int8 weights per channel x int8 activations per token (SmoothQuant's format)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRAMMAR = (
    "w{bits}[g{group}|pt][-asym] with bits 2..8 (e.g. w8, w4g64, w4g32-asym, w3g64, w8pt), "
    "nf4g{group} (e.g. nf4g64), fp8, w8a8"
)

_INT_RE = re.compile(r"^w(?P<bits>\d+)(?:(?P<pt>pt)|g(?P<group>\d+))?(?P<asym>-asym)?$")
_NF4_RE = re.compile(r"^nf4g(?P<group>\d+)$")


@dataclass(frozen=True)
class Scheme:
    """A storage scheme for a weight matrix (out_features, in_features).

    granularity: "tensor" (one scale), "channel" (one per output row) or "group"
    (one per `group_size` consecutive input columns of each row).
    """

    kind: str  # "int" | "nf4" | "fp8"
    bits: int
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    act_bits: int | None = None  # 8 for w8a8: activations quantized per token at run time

    def __post_init__(self) -> None:
        if self.kind not in ("int", "nf4", "fp8"):
            raise ValueError(f"unknown scheme kind {self.kind!r}; valid: int, nf4, fp8")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"integer schemes take 2..8 bits, got {self.bits}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size is set exactly when granularity is 'group'")
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group size must be a multiple of 8 and at least 8, got {self.group_size}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"only 8-bit activations are supported, got {self.act_bits}")

    @property
    def name(self) -> str:
        if self.kind == "nf4":
            return f"nf4g{self.group_size}"
        if self.kind == "fp8":
            return "fp8"
        if self.act_bits:
            return f"w{self.bits}a{self.act_bits}"
        suffix = {"tensor": "pt", "channel": "", "group": f"g{self.group_size}"}[self.granularity]
        return f"w{self.bits}{suffix}{'' if self.symmetric else '-asym'}"

    def scale_count(self, out_features: int, in_features: int) -> int:
        if self.granularity == "tensor":
            return 1
        if self.granularity == "channel":
            return out_features
        return out_features * (in_features // self.group_size)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """All stored bits: codes + fp16 scales (+ fp16 offsets when asymmetric); fp8 scales are fp32."""
        codes = out_features * in_features * self.bits
        scale_bits = 32 if self.kind == "fp8" else 16
        per_scale = scale_bits + (16 if not self.symmetric else 0)
        return codes + self.scale_count(out_features, in_features) * per_scale

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)


def parse_scheme(name: str) -> Scheme:
    """Parse a scheme name; a typo gets an error that lists the grammar."""
    text = name.strip().lower()
    if text == "fp8":
        return Scheme(kind="fp8", bits=8, granularity="channel")
    if text == "w8a8":
        return Scheme(kind="int", bits=8, granularity="channel", act_bits=8)
    m = _NF4_RE.match(text)
    if m:
        return Scheme(kind="nf4", bits=4, granularity="group", group_size=int(m["group"]))
    m = _INT_RE.match(text)
    if not m:
        raise ValueError(f"unknown scheme {name!r}; the grammar is {GRAMMAR}")
    bits = int(m["bits"])
    if not 2 <= bits <= 8:
        raise ValueError(f"scheme {name!r}: integer schemes take 2..8 bits; the grammar is {GRAMMAR}")
    if m["pt"]:
        granularity, group = "tensor", None
    elif m["group"]:
        granularity, group = "group", int(m["group"])
    else:
        granularity, group = "channel", None
    try:
        return Scheme(kind="int", bits=bits, granularity=granularity, group_size=group,
                      symmetric=not m["asym"])
    except ValueError as e:
        raise ValueError(f"scheme {name!r}: {e}") from e
