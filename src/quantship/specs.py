"""Frozen, validated configs. CLI defaults come from these dataclasses (never a second copy)."""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .formats.scheme import Scheme, parse_scheme


@dataclass(frozen=True)
class QuantSpec:
    scheme: str
    method: str = "rtn"
    method_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs, e.g. (("clip_search", True),)
    ignore: tuple[str, ...] = ()  # regexes over module names kept in source precision
    quantize_head: bool = False
    seed: int = 0
    calib: str | None = None  # calibration source spec (methods that use data)
    calib_samples: int = 128
    calib_seqlen: int = 512

    def __post_init__(self) -> None:
        self.parsed_scheme  # raises with the grammar on a typo
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"--ignore {pattern!r} is not a valid regular expression: {e}") from e
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise ValueError("calib_samples must be >= 1 and calib_seqlen >= 8")

    @property
    def parsed_scheme(self) -> Scheme:
        return parse_scheme(self.scheme)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.method_params)


@dataclass(frozen=True)
class EvalSpec:
    ctx: int = 512  # tokens per window; the second half of each window is scored (llama.cpp)
    max_windows: int = 40  # cap on windows per text source (0 = all)
    batch_size: int = 4  # windows per forward pass

    def __post_init__(self) -> None:
        if self.ctx < 16:
            raise ValueError(f"ctx must be at least 16 tokens, got {self.ctx}")
        if self.max_windows < 0 or self.batch_size < 1:
            raise ValueError("max_windows must be >= 0 and batch_size >= 1")


def default_of(cls, name: str):
    """The dataclass default of a field: the CLI's single source of defaults."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def parse_method_params(pairs: list[str]) -> tuple[tuple[str, Any], ...]:
    """`key=value` strings -> typed pairs (bool, int, float or str)."""
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"method parameter {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        out.append((key.strip().replace("-", "_"), _coerce(raw.strip())))
    return tuple(out)


def _coerce(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw

