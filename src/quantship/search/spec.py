"""The search's settings: validated before any model is loaded (no torch import, so the CLI parses fast)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..formats.scheme import Scheme, parse_scheme

SENSITIVITIES = ("fisher", "kld")
DEFAULT_LADDER = ("w8", "w4g64", "nf4g64", "w3g64")


@dataclass(frozen=True)
class SearchSpec:
    model: str
    ladder: tuple[str, ...] = DEFAULT_LADDER
    method: str = "rtn"
    method_params: tuple[tuple[str, Any], ...] = ()
    max_bpw: float | None = None  # bits budget: quantized layers' bits per weight
    max_kld: float | None = None  # quality budget: mean KLD on the calibration tokens
    calib: str | None = None  # calibration source spec (default: news:0.7,code:0.3 calibration splits)
    calib_samples: int = 8  # sensitivity and loop measurements: samples x seqlen tokens
    calib_seqlen: int = 128
    sensitivity: str = "fisher"  # fisher (proxy) | kld (measured per group x rung)
    max_iters: int = 5
    promote: int = 0  # groups promoted per iteration (0: 5% of the groups, at least 1)
    tolerance: float = 0.25  # max_bpw: measured may exceed predicted by this fraction
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ladder", tuple(s.strip() for s in self.ladder if s.strip()))
        if not self.ladder:
            raise ValueError("--ladder is empty; give schemes such as w8,w4g64,nf4g64,w3g64")
        for rung in self.ladder:
            try:
                scheme = parse_scheme(rung)
            except ValueError as e:
                raise ValueError(f"--ladder rung {rung!r}: {e}") from e
            if scheme.act_bits:
                raise ValueError(f"--ladder rung {rung!r}: weight+activation schemes are not searched; use "
                                 f"weight-only schemes")
        names = [parse_scheme(r).name for r in self.ladder]
        if len(set(names)) != len(names):
            raise ValueError(f"--ladder {','.join(self.ladder)} names a scheme twice")
        if (self.max_bpw is None) == (self.max_kld is None):
            raise ValueError("give exactly one of --max-bpw (bits budget) or --budget (quality budget)")
        if self.max_bpw is not None and not (math.isfinite(self.max_bpw) and self.max_bpw > 0):
            raise ValueError(f"--max-bpw must be a positive number, got {self.max_bpw}")
        cheapest = min(self.schemes, key=lambda sc: sc.bits)
        if self.max_bpw is not None and self.max_bpw < cheapest.bits:
            raise ValueError(f"--max-bpw {self.max_bpw} is below the cheapest rung of the ladder: {cheapest.name} "
                             f"stores {cheapest.bits} bits per weight in its codes alone; raise --max-bpw or add a "
                             f"cheaper rung to --ladder")
        if self.max_kld is not None and not (math.isfinite(self.max_kld) and self.max_kld > 0):
            raise ValueError(f"the budget's kld_mean must be positive, got {self.max_kld}")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"unknown sensitivity {self.sensitivity!r}; valid: {', '.join(SENSITIVITIES)}")
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise ValueError("calib_samples must be >= 1 and calib_seqlen >= 8")
        if self.max_iters < 1 or self.promote < 0 or self.tolerance < 0:
            raise ValueError("max_iters must be >= 1, promote >= 0 and tolerance >= 0")

    @property
    def schemes(self) -> list[Scheme]:
        return [parse_scheme(r) for r in self.ladder]
