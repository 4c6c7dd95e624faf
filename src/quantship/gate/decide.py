"""The gate's verdict: pure (measurements + budget -> Decision), no model is loaded here.

Each budget term becomes one `Term`: its limit, the measured value, a 95% CI where the measurement
has one, and whether it holds. A term whose measurement is missing fails with the reason; nothing
passes silently. Judging rules (docs/gate.md):

- kld_mean, kld_p99, ppl_increase_pct, top1_agreement, ece_increase and the slices: the point
  estimate against the limit (kld_mean and ppl_increase_pct show their 95% CI beside it).
- suites.max_drop_pct: drop = -(candidate - baseline) in points; judged on the UPPER bound of the
  paired bootstrap 95% CI of the drop, so a small sample cannot pass on a lucky point estimate.
- no_significant_regression: fails when the suite's drop is significant (CI excludes 0, McNemar p < 0.05).
- performance: candidate vs baseline bench reports of the same run; p95 over the timed runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .budget import AT_LEAST, MEMORY_KINDS, Budget

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Term:
    name: str
    limit: float
    measured: float | None
    ci95: tuple[float, float] | None
    passed: bool
    reason: str
    judged_on: str = "point estimate"  # or "upper bound of the 95% CI"

    def to_json(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return out


@dataclass(frozen=True)
class Evidence:
    """What was measured: scores (EvalReport with ppl/KLD, may be None), task suites (TaskResults),
    bench reports of both models (BenchReport)."""

    scores: object | None = None
    tasks: object | None = None
    bench_baseline: object | None = None
    bench_candidate: object | None = None
    missing: dict[str, str] = field(default_factory=dict)  # "scores" / "tasks" / "bench" -> why it is absent


@dataclass(frozen=True)
class Decision:
    passed: bool
    terms: tuple[Term, ...]

    @property
    def failed(self) -> list[Term]:
        return [t for t in self.terms if not t.passed]

    def to_json(self) -> dict:
        return {"passed": self.passed, "terms": [t.to_json() for t in self.terms]}


def _compare(name: str, limit: float, measured: float | None, *, ci95=None, judged: float | None = None,
             judged_on: str = "point estimate", unit: str = "", why_missing: str = "") -> Term:
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        return Term(name, limit, None, ci95, False, f"not measured: {why_missing or 'no measurement'}", judged_on)
    value = measured if judged is None else judged
    at_least = name.split(".")[0] in AT_LEAST or name.rsplit(".", 1)[-1] == "top1_agreement"
    ok = value >= limit if at_least else value <= limit
    sign = ">=" if at_least else "<="
    what = f"{value:.6g}{unit}" + ("" if judged is None else f" ({judged_on})")
    reason = f"{what} {sign} {limit:g}{unit}" if ok else f"{what} is not {sign} {limit:g}{unit}"
    return Term(name, limit, float(measured), ci95, bool(ok), reason, judged_on)


def _score_terms(prefix: str, scores, limits: dict[str, float], why: str) -> list[Term]:
    """The quality terms over one TokenScores (pooled or one text)."""
    terms = []
    for key, limit in limits.items():
        name = f"{prefix}{key}"
        if scores is None:
            terms.append(_compare(name, limit, None, why_missing=why))
        elif key == "kld_mean":
            half = Z95 * scores.kld.stderr
            terms.append(_compare(name, limit, scores.kld.mean, ci95=(scores.kld.mean - half, scores.kld.mean + half)))
        elif key == "kld_p99":
            terms.append(_compare(name, limit, scores.kld.p99))
        elif key == "ppl_increase_pct":
            ln, se = scores.ppl.ln_ratio, scores.ppl.ln_ratio_stderr
            pct = 100 * (scores.ppl.candidate / scores.ppl.baseline - 1)
            ci = (100 * math.expm1(ln - Z95 * se), 100 * math.expm1(ln + Z95 * se))
            terms.append(_compare(name, limit, pct, ci95=ci, unit="%"))
        elif key == "top1_agreement":
            terms.append(_compare(name, limit, scores.top1_agreement))
        elif key == "ece_increase":
            terms.append(_compare(name, limit, scores.ece.candidate - scores.ece.baseline))
    return terms


def _suite(tasks, name: str, why: str):
    """-> (SuiteResult or None, reason it is absent)."""
    if tasks is None:
        return None, why or "no task suites were run"
    result = tasks.suites.get(name)
    if result is None:
        return None, f"suite {name!r} was not run (ran: {', '.join(tasks.suites) or 'none'})"
    if not hasattr(result, "ci95"):
        return None, f"suite {name!r} is a scoring suite without a paired accuracy delta"
    return result, ""


def _suite_terms(budget: Budget, tasks, why: str) -> list[Term]:
    terms = []
    for name, limits in budget.suites.items():
        result, missing = _suite(tasks, name, why)
        limit = limits["max_drop_pct"]
        if result is None:
            terms.append(_compare(f"suites.{name}.max_drop_pct", limit, None, why_missing=missing))
            continue
        drop = -100 * result.delta  # points; positive = the candidate is worse
        ci = (-100 * result.ci95[1], -100 * result.ci95[0])
        terms.append(_compare(f"suites.{name}.max_drop_pct", limit, drop, ci95=ci, judged=ci[1], unit=" pt",
                              judged_on="upper bound of the 95% CI"))
    for name in budget.no_significant_regression:
        result, missing = _suite(tasks, name, why)
        term = f"no_significant_regression.{name}"
        if result is None:
            terms.append(Term(term, 0.0, None, None, False, f"not measured: {missing}"))
            continue
        drop = -100 * result.delta
        ci = (-100 * result.ci95[1], -100 * result.ci95[0])
        regressed = result.significant and result.delta < 0
        reason = (f"significant drop of {drop:.3g} pt (McNemar p = {result.p_value:.3g})" if regressed
                  else f"no significant drop (delta {-drop:+.3g} pt, McNemar p = {result.p_value:.3g})")
        terms.append(Term(term, 0.0, drop, ci, not regressed, reason, "paired CI and McNemar p < 0.05"))
    return terms


def p95(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.percentile(values, 95)) if values else None


def latency_p95(bench, which: str) -> float | None:
    """p95 TTFT or TPOT (seconds) of a BenchReport: over the timed single-stream runs, or the load summary's."""
    if bench.single is not None:
        return p95(getattr(bench.single, f"{which}_runs_s"))
    return getattr(bench.load, f"{which}_s").p95


def _perf_terms(budget: Budget, base, cand, why: str) -> list[Term]:
    terms = []
    have = base is not None and cand is not None
    for key, limit in budget.perf.items():
        if key == "memory_reduction_pct":
            limits = limit if isinstance(limit, dict) else {k: limit for k in MEMORY_KINDS}
            for kind, lim in limits.items():
                attr = "peak_rss_bytes" if kind == "peak_rss" else "weight_bytes"
                value = 100 * (1 - getattr(cand, attr) / getattr(base, attr)) if have and getattr(base, attr) else None
                terms.append(_compare(f"{key}.{kind}", lim, value, unit="%", why_missing=why))
        elif key in ("ttft_p95_reduction_pct", "tpot_p95_reduction_pct"):
            which = key.split("_")[0]
            b, c = (latency_p95(base, which), latency_p95(cand, which)) if have else (None, None)
            value = 100 * (1 - c / b) if b and c is not None else None
            terms.append(_compare(key, limit, value, unit="%",
                                  why_missing=why if not have else f"no {which.upper()} in the bench reports"))
        elif key == "decode_speedup":
            b, c = (base.decode_tok_s, cand.decode_tok_s) if have else (None, None)
            value = c / b if b and c is not None else None
            terms.append(_compare(key, limit, value, unit="x", why_missing=why or "no decode rate in the bench reports"))
        elif key == "cost_per_million_tokens":
            value = cand.cost_per_million_output_tokens if cand is not None else None
            terms.append(_compare(key, limit, value, why_missing=why or "the bench ran without a price per hour"))
    return terms


def decide(budget: Budget, evidence: Evidence) -> Decision:
    """Every term of the budget judged on the evidence; passed = every term holds (and there is one)."""
    missing = evidence.missing
    terms = _score_terms("", evidence.scores, budget.quality, missing.get("scores", "the evaluation did not run"))
    for text, limits in budget.slices.items():
        scores = evidence.scores
        if scores is None:
            why = missing.get("scores", "the evaluation did not run")
            terms += _score_terms(f"slices.{text}.", None, limits, why)
        elif text not in scores.texts:
            why = f"text {text!r} was not evaluated (texts: {', '.join(scores.texts)})"
            terms += _score_terms(f"slices.{text}.", None, limits, why)
        else:
            terms += _score_terms(f"slices.{text}.", scores.texts[text], limits, "")
    terms += _suite_terms(budget, evidence.tasks, missing.get("tasks", ""))
    terms += _perf_terms(budget, evidence.bench_baseline, evidence.bench_candidate, missing.get("bench", ""))
    return Decision(passed=bool(terms) and all(t.passed for t in terms), terms=tuple(terms))
