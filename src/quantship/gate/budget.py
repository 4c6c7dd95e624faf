"""Error budgets: a small YAML file of limits a candidate must hold against its baseline.

Every term is optional; a file holding only `kld_mean: 0.01` is a valid budget. Terms (docs/gate.md):

    quality (candidate vs baseline, `quantship eval`)
      kld_mean, kld_p99            at most (KL(P_base || P_cand) per scored token)
      ppl_increase_pct             at most: 100 * (PPL_cand / PPL_base - 1)
      top1_agreement               at least: the rate of the same top token
      ece_increase                 at most: ECE_cand - ECE_base
      suites: {NAME: {max_drop_pct: X}}   accuracy drop in points, judged on the upper bound of the
                                          paired 95% CI of the drop
      no_significant_regression: [NAME, ...]  no significant drop (paired CI excludes 0 and McNemar p < 0.05)
      slices: {TEXT: {kld_mean: X, ...}}  the quality terms on one evaluation text (news, code, a file name)
    performance (candidate vs baseline, `quantship bench` on both in the same run)
      ttft_p95_reduction_pct, tpot_p95_reduction_pct   at least: 100 * (1 - p95_cand / p95_base)
      decode_speedup               at least: decode tok/s cand / base
      memory_reduction_pct         at least, for peak RSS and for weight bytes (a number: both; or
                                   {peak_rss: X, weight_bytes: Y})
      cost_per_million_tokens      at most, in the currency of bench.price_per_hour (required with it)
    settings of the measurements the terms need
      eval:  EvalSpec fields (ctx, max_windows, batch_size, texts, suite_files, full, limit, seed)
      bench: BenchSpec fields except model (input_len, output_len, repeats, concurrency, price_per_hour ...)

Parsing is strict: an unknown key is an error naming it and listing the valid ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUALITY_TERMS = ("kld_mean", "kld_p99", "ppl_increase_pct", "top1_agreement", "ece_increase")
SLICE_TERMS = ("kld_mean", "kld_p99", "ppl_increase_pct", "top1_agreement")
SUITE_TERMS = ("max_drop_pct",)
PERF_TERMS = ("ttft_p95_reduction_pct", "tpot_p95_reduction_pct", "decode_speedup", "memory_reduction_pct",
              "cost_per_million_tokens")
MEMORY_KINDS = ("peak_rss", "weight_bytes")
SECTIONS = ("suites", "no_significant_regression", "slices", "eval", "bench")
TOP_KEYS = (*QUALITY_TERMS, *PERF_TERMS, *SECTIONS)
EVAL_KEYS = ("ctx", "max_windows", "batch_size", "texts", "suite_files", "full", "limit", "seed")
BENCH_KEYS = ("concurrency", "request_rate", "num_prompts", "input_len", "output_len", "range_ratio", "kv", "max_batch",
              "repeats", "warmup", "slo", "seed", "price_per_hour", "measure_bandwidth", "corpus")
# Terms whose limit is a lower bound (the measured value must be at least the limit); the rest are upper bounds.
AT_LEAST = ("top1_agreement", "ttft_p95_reduction_pct", "tpot_p95_reduction_pct", "decode_speedup",
            "memory_reduction_pct")


class BudgetError(ValueError):
    """A budget file that cannot be used; the message names the bad key and the valid ones."""


@dataclass(frozen=True)
class Budget:
    quality: dict[str, float] = field(default_factory=dict)  # QUALITY_TERMS -> limit
    suites: dict[str, dict[str, float]] = field(default_factory=dict)  # suite -> {max_drop_pct: X}
    no_significant_regression: tuple[str, ...] = ()
    slices: dict[str, dict[str, float]] = field(default_factory=dict)  # text name -> {SLICE_TERMS: X}
    perf: dict[str, Any] = field(default_factory=dict)  # PERF_TERMS -> limit (memory: {peak_rss, weight_bytes})
    eval: dict[str, Any] = field(default_factory=dict)  # EvalSpec overrides
    bench: dict[str, Any] = field(default_factory=dict)  # BenchSpec overrides

    @property
    def needs_scores(self) -> bool:
        """Whether a term needs the perplexity / KLD evaluation."""
        return bool(self.quality or self.slices)

    @property
    def needed_suites(self) -> tuple[str, ...]:
        """The task suites the terms name, in first-mention order."""
        return tuple(dict.fromkeys([*self.suites, *self.no_significant_regression]))

    @property
    def needs_bench(self) -> bool:
        return bool(self.perf)

    @property
    def empty(self) -> bool:
        return not (self.quality or self.suites or self.no_significant_regression or self.slices or self.perf)

    def eval_spec(self, **overrides):
        """The EvalSpec the terms need: the eval section, the texts the slices name (built-ins) added
        to the default news text, the named built-in suites; overrides (CLI flags) last."""
        from ..evaluate.suites import GENERATION_SUITES, SCORING_SUITES
        from ..specs import BUILTIN_TEXTS, EvalSpec

        settings = dict(self.eval)
        if "texts" not in settings:
            extra = [s for s in self.slices if s in BUILTIN_TEXTS and s != "news"]
            settings["texts"] = ("news", *extra) if extra else ()
        suites = [s for s in self.needed_suites if s in (*GENERATION_SUITES, *SCORING_SUITES)]
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return EvalSpec(suites=tuple(suites), **settings)

    def bench_spec(self, model: str):
        from ..specs import BenchSpec

        settings = {"measure_bandwidth": False, **self.bench}
        return BenchSpec(model=str(model), **settings)

    def to_json(self) -> dict:
        out: dict[str, Any] = dict(self.quality)
        if self.suites:
            out["suites"] = {k: dict(v) for k, v in self.suites.items()}
        if self.no_significant_regression:
            out["no_significant_regression"] = list(self.no_significant_regression)
        if self.slices:
            out["slices"] = {k: dict(v) for k, v in self.slices.items()}
        out.update(self.perf)
        if self.eval:
            out["eval"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.eval.items()}
        if self.bench:
            out["bench"] = dict(self.bench)
        return out


def _unknown(where: str, key: Any, valid) -> BudgetError:
    return BudgetError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _number(where: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"{where}: expected a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise BudgetError(f"{where}: {value!r} is outside {bounds}")
    return float(value)


def _mapping(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise BudgetError(f"{where}: expected a mapping (key: value), got {type(value).__name__} {value!r}")
    for key in value:
        if not isinstance(key, str):
            raise BudgetError(f"{where}: keys must be names, got {key!r}")
    return value


_RANGES = {"kld_mean": (0, None), "kld_p99": (0, None), "ppl_increase_pct": (None, None), "top1_agreement": (0, 1),
           "ece_increase": (None, None), "max_drop_pct": (0, 100), "ttft_p95_reduction_pct": (None, 100),
           "tpot_p95_reduction_pct": (None, 100), "decode_speedup": (0, None), "memory_reduction_pct": (None, 100),
           "cost_per_million_tokens": (0, None)}


def _term(where: str, name: str, value: Any) -> float:
    low, high = _RANGES[name]
    return _number(f"{where}{name}", value, low=low, high=high)


def parse_budget(data: Any, *, where: str = "budget") -> Budget:
    """A budget from its YAML mapping (None or {} -> a budget without terms)."""
    if data is None:
        data = {}
    data = _mapping(where, data)
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(where, key, TOP_KEYS)
    quality = {k: _term(f"{where}: ", k, data[k]) for k in QUALITY_TERMS if k in data}
    suites = {}
    for name, terms in _mapping(f"{where}: suites", data.get("suites") or {}).items():
        terms = _mapping(f"{where}: suites.{name}", terms)
        for key in terms:
            if key not in SUITE_TERMS:
                raise _unknown(f"{where}: suites.{name}", key, SUITE_TERMS)
        if not terms:
            raise BudgetError(f"{where}: suites.{name} has no term; valid keys: {', '.join(SUITE_TERMS)}")
        suites[name] = {k: _term(f"{where}: suites.{name}.", k, v) for k, v in terms.items()}
    nsr = data.get("no_significant_regression") or []
    if isinstance(nsr, str):
        nsr = [nsr]
    if not isinstance(nsr, list) or not all(isinstance(s, str) and s for s in nsr):
        raise BudgetError(f"{where}: no_significant_regression: expected a list of suite names, got {nsr!r}")
    slices = {}
    for name, terms in _mapping(f"{where}: slices", data.get("slices") or {}).items():
        terms = _mapping(f"{where}: slices.{name}", terms)
        for key in terms:
            if key not in SLICE_TERMS:
                raise _unknown(f"{where}: slices.{name}", key, SLICE_TERMS)
        if not terms:
            raise BudgetError(f"{where}: slices.{name} has no term; valid keys: {', '.join(SLICE_TERMS)}")
        slices[name] = {k: _term(f"{where}: slices.{name}.", k, v) for k, v in terms.items()}
    perf: dict[str, Any] = {}
    for key in PERF_TERMS:
        if key not in data:
            continue
        if key == "memory_reduction_pct" and isinstance(data[key], dict):
            mem = _mapping(f"{where}: {key}", data[key])
            for kind in mem:
                if kind not in MEMORY_KINDS:
                    raise _unknown(f"{where}: {key}", kind, MEMORY_KINDS)
            perf[key] = {k: _number(f"{where}: {key}.{k}", v, high=100) for k, v in mem.items()}
        else:
            perf[key] = _term(f"{where}: ", key, data[key])
    eval_settings = _section(where, "eval", data.get("eval"), EVAL_KEYS)
    bench_settings = _section(where, "bench", data.get("bench"), BENCH_KEYS)
    if "cost_per_million_tokens" in perf and bench_settings.get("price_per_hour") is None:
        raise BudgetError(f"{where}: cost_per_million_tokens needs bench.price_per_hour (the machine's price per "
                          f"hour the cost is computed from)")
    budget = Budget(quality=quality, suites=suites, no_significant_regression=tuple(nsr), slices=slices, perf=perf,
                    eval=eval_settings, bench=bench_settings)
    _check_specs(where, budget)
    return budget


def _section(where: str, name: str, value: Any, valid: tuple[str, ...]) -> dict:
    section = dict(_mapping(f"{where}: {name}", value or {}))
    for key in section:
        if key not in valid:
            raise _unknown(f"{where}: {name}", key, valid)
    for key in ("texts", "suite_files"):
        if key in section:
            v = section[key]
            section[key] = tuple([v] if isinstance(v, str) else v or ())
    return section


def _check_specs(where: str, budget: Budget) -> None:
    """The eval and bench sections make valid specs (their own checks, e.g. a missing text file)."""
    try:
        budget.eval_spec()
        if budget.needs_bench or budget.bench:
            budget.bench_spec("model")
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise BudgetError(f"{where}: {e}") from e


def load_budget(path: str | Path) -> Budget:
    """Read and validate a budget YAML file; BudgetError (one line) on anything wrong."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BudgetError(f"budget file {path} does not exist (write a template with `quantship budget init`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BudgetError(f"cannot read budget file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BudgetError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return parse_budget(data, where=str(path))


DEFAULT_TEMPLATE = """\
# quantship error budget (docs/gate.md). Every term is optional; delete what you do not need.
# A candidate passes when every term holds against the baseline measured in the same run.

# Task suites: absolute accuracy drop in percentage points, judged on the upper bound of the
# paired 95% confidence interval of the drop (not on the point estimate).
suites:
  code: {max_drop_pct: 1.5}
  math: {max_drop_pct: 1.5}
  json: {max_drop_pct: 1.5}
  qa: {max_drop_pct: 1.5}

# Latency (p95 of the single-stream runs of `quantship bench`): at least 20% lower than the baseline.
ttft_p95_reduction_pct: 20
tpot_p95_reduction_pct: 20

# Memory: peak RSS and weight bytes at least 50% lower than the baseline.
memory_reduction_pct: 50

# More terms (uncomment to use):
# kld_mean: 0.01                 # mean KL(P_base || P_cand) per scored token, at most
# kld_p99: 0.1
# ppl_increase_pct: 2.0          # 100 * (PPL_cand / PPL_base - 1), at most
# top1_agreement: 0.95           # same top token rate, at least
# ece_increase: 0.01             # ECE_cand - ECE_base, at most
# no_significant_regression: [code, math]
# slices: {code: {kld_mean: 0.05}}
# decode_speedup: 1.3            # decode tok/s candidate / baseline, at least
# cost_per_million_tokens: 0.50  # needs bench.price_per_hour

# Settings of the measurements (defaults: quantship eval / bench defaults):
# eval: {max_windows: 40, limit: 50}
# bench: {input_len: 128, output_len: 128, repeats: 3, price_per_hour: 1.20}
"""
