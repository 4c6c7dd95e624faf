"""Frozen, validated configs. CLI defaults come from these dataclasses (never a second copy)."""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .formats.scheme import Scheme, parse_scheme


@dataclass(frozen=True)
class QuantSpec:
    scheme: str  # the default scheme of every target layer
    method: str = "rtn"
    # ordered (regex, scheme) pairs: a layer whose full name the regex searches gets that scheme;
    # the last matching override wins, layers no override matches keep `scheme`
    overrides: tuple[tuple[str, str], ...] = ()
    method_params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs, e.g. (("clip_search", True),)
    ignore: tuple[str, ...] = ()  # regexes over module names kept in source precision
    quantize_head: bool = False
    seed: int = 0
    calib: str | None = None  # calibration source spec (methods that use data)
    calib_samples: int = 128
    calib_seqlen: int = 512

    def __post_init__(self) -> None:
        from .methods.registry import resolve_alias

        # a shorthand method name (awq+gptq) is stored as the method it stands for, with its parameters
        method, params = resolve_alias(self.method, dict(self.method_params))
        if method != self.method:
            object.__setattr__(self, "method", method)
            object.__setattr__(self, "method_params", tuple(params.items()))
        self.parsed_scheme  # raises with the grammar on a typo
        for pair in self.overrides:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
                raise ValueError(f"overrides must be (regex, scheme) string pairs, got {pair!r}")
        for pattern, scheme in self.overrides:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"--override {pattern}={scheme}: {pattern!r} is not a valid regular expression: "
                                 f"{e}") from e
            try:
                parse_scheme(scheme)
            except ValueError as e:
                raise ValueError(f"--override {pattern}={scheme}: {e}") from e
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

    def scheme_for(self, name: str) -> Scheme:
        """The scheme of the layer with full module name `name`: the last override whose regex
        is found in the name, else the default scheme."""
        chosen = self.scheme
        for pattern, scheme in self.overrides:
            if re.search(pattern, name):
                chosen = scheme
        return parse_scheme(chosen)

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


def parse_overrides(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`REGEX=SCHEME` strings (CLI --override) -> ordered (regex, scheme) pairs; the scheme is
    what follows the last '=' (scheme names hold none), so a regex may contain '='."""
    out = []
    for item in items:
        pattern, sep, scheme = item.rpartition("=")
        if not sep or not pattern.strip() or not scheme.strip():
            raise ValueError(f"override {item!r} must look like REGEX=SCHEME, e.g. 'down_proj=w8' or "
                             f"'layers\\.0\\.=w8'")
        out.append((pattern.strip(), scheme.strip()))
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

