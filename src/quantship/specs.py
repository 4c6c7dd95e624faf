"""Frozen, validated configs. CLI defaults come from these dataclasses (never a second copy)."""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
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


BUILTIN_TEXTS = ("news", "code")  # corpora whose eval split `--text` can name


@dataclass(frozen=True)
class EvalSpec:
    ctx: int = 512  # tokens per window; the second half of each window is scored (llama.cpp)
    max_windows: int = 40  # cap on windows per text source (0 = all)
    batch_size: int = 4  # windows per forward pass
    texts: tuple[str, ...] = ()  # built-in corpus names (news, code: their eval split) or text files; () = news
    suites: tuple[str, ...] = ()  # task suites by name ("all" = every built-in suite)
    suite_files: tuple[str, ...] = ()  # user suites (JSONL)
    full: bool = False  # full suites (e.g. all 164 HumanEval problems)
    limit: int | None = None  # at most this many items per suite
    seed: int = 0  # suites: sampling of items, bootstrap

    def __post_init__(self) -> None:
        for name in ("texts", "suites", "suite_files"):  # lists from callers become tuples (frozen, hashable)
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v) for v in value or ()))
        if self.ctx < 16:
            raise ValueError(f"ctx must be at least 16 tokens, got {self.ctx}")
        if self.max_windows < 0 or self.batch_size < 1:
            raise ValueError("max_windows must be >= 0 and batch_size >= 1")
        for item in self.texts:
            if item not in BUILTIN_TEXTS and not Path(item).is_file():
                raise FileNotFoundError(f"--text {item!r}: no such file, and not a built-in corpus "
                                        f"({', '.join(BUILTIN_TEXTS)})")
        from .evaluate.suites import GENERATION_SUITES, SCORING_SUITES

        known = (*GENERATION_SUITES, *SCORING_SUITES)
        unknown = [s for s in self.suites if s not in known and s != "all"]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}; built-in suites: {', '.join(known)} (or all)")
        for path in self.suite_files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--suite-file {path!r}: no such file")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (items per suite) or None, got {self.limit}")

    @property
    def suite_names(self) -> list[str]:
        """The suites to run, "all" expanded."""
        from .evaluate.suites import GENERATION_SUITES, SCORING_SUITES

        if "all" in self.suites:
            return [*GENERATION_SUITES, *SCORING_SUITES]
        return list(self.suites)

    @property
    def runs_tasks(self) -> bool:
        return bool(self.suites or self.suite_files)


KV_KINDS = ("float32", "bfloat16", "int8", "fp8")


@dataclass(frozen=True)
class BenchSpec:
    model: str
    concurrency: int | None = None  # closed loop: requests in flight
    request_rate: float | None = None  # open loop: Poisson arrivals per second (inf: all at once)
    num_prompts: int = 16  # load modes: requests sent
    input_len: int = 128  # prompt tokens (mean when range_ratio > 0)
    output_len: int = 128  # generated tokens per request (mean when range_ratio > 0)
    range_ratio: float = 0.0  # load modes: lengths uniform in len x [1 - r, 1 + r]
    kv: str = "float32"
    max_batch: int = 16
    repeats: int = 3  # single stream: timed repeats, median reported
    warmup: int = 1  # untimed runs first (single stream); load modes send one short warm-up request
    slo: str = ""  # goodput SLOs: "ttft=0.5,tpot=50ms,e2e=10s"
    seed: int = 0
    price_per_hour: float | None = None
    measure_bandwidth: bool = True  # machine read bandwidth, in a subprocess (keeps its buffer out of peak RSS)
    corpus: str = "news"

    def __post_init__(self) -> None:
        if not str(self.model).strip():
            raise ValueError("model is empty: give a built-in name, an HF folder or a quantship artifact")
        if self.concurrency is not None and self.request_rate is not None:
            raise ValueError("give --concurrency (closed loop) or --request-rate (open loop), not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not (self.request_rate > 0):
            raise ValueError(f"request rate must be > 0 requests/s (inf sends all at once), got {self.request_rate}")
        for name, low in (("num_prompts", 1), ("input_len", 1), ("output_len", 2), ("max_batch", 1), ("repeats", 1),
                          ("warmup", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if self.range_ratio and self.mode == "single":
            raise ValueError("range_ratio applies to load modes; add --concurrency or --request-rate")
        if self.kv not in KV_KINDS:
            raise ValueError(f"unknown KV cache {self.kv!r}; valid: {', '.join(KV_KINDS)}")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise ValueError(f"price per hour must be >= 0, got {self.price_per_hour}")
        self.slos  # raises on a malformed --slo

    @property
    def mode(self) -> str:
        if self.concurrency is not None:
            return "concurrency"
        return "request_rate" if self.request_rate is not None else "single"

    @property
    def slos(self) -> dict[str, float]:
        from .bench.metrics import parse_slo

        return parse_slo(self.slo)

    @property
    def max_seq_len(self) -> int:
        """Longest request the engine must hold (prompt + output, at the top of the length range)."""
        grow = 1 + self.range_ratio
        return math.ceil(self.input_len * grow) + math.ceil(self.output_len * grow)


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

