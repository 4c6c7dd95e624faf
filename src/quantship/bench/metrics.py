"""Serving metrics as `vllm bench serve` defines them, from per-request token timestamps.

    TTFT  first token time - arrival
    E2E   last token time - arrival
    TPOT  (E2E - TTFT) / (output_tokens - 1)     (requests with one token have none)
    ITL   gaps between consecutive tokens of a request (all gaps of all requests pooled)
    goodput  requests/s that met every SLO (ttft, tpot, e2e)
Percentiles use linear interpolation (numpy's default), reported as mean, median, p95, p99.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SLO_KEYS = ("ttft", "tpot", "e2e")
_SLO_ALIASES = {"e2el": "e2e"}  # vllm's spelling
_SLO_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>ms|s)?$")


@dataclass(frozen=True)
class RequestTiming:
    """One request: when it arrived and when each of its tokens came out (perf_counter seconds)."""

    arrival: float
    token_times: tuple[float, ...]
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_times:
            raise ValueError("a request needs at least one token time")
        if self.token_times[0] < self.arrival or any(b < a for a, b in zip(self.token_times, self.token_times[1:])):
            raise ValueError("token times must not precede the arrival and must not decrease")

    @property
    def output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy.percentile's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p95": None, "p99": None}
    return {"mean": sum(values) / len(values), "median": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99)}


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=0.5,tpot=50ms' -> {'ttft': 0.5, 'tpot': 0.05} in seconds (a bare number is seconds)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        key = _SLO_ALIASES.get(key.strip().lower(), key.strip().lower())
        m = _SLO_RE.match(value.strip().lower())
        if not sep or key not in SLO_KEYS or not m:
            raise ValueError(f"cannot read SLO {part!r}: write key=value with key in {', '.join(SLO_KEYS)} and "
                             f"value in seconds or with a unit, e.g. ttft=0.5,tpot=50ms,e2e=10s")
        if key in out:
            raise ValueError(f"SLO {key!r} given twice in {text!r}")
        out[key] = float(m["num"]) / (1000.0 if m["unit"] == "ms" else 1.0)
    return out


def meets_slo(t: RequestTiming, slo: dict[str, float]) -> bool:
    values = {"ttft": t.ttft, "tpot": t.tpot, "e2e": t.e2e}
    return all(values[k] is None or values[k] <= limit for k, limit in slo.items())


def load_metrics(timings: list[RequestTiming], duration: float, slo: dict[str, float] | None = None) -> dict:
    """The `vllm bench serve` summary of a run that lasted `duration` seconds."""
    if not timings:
        raise ValueError("no completed requests to summarize")
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    output = sum(t.output_tokens for t in timings)
    good = sum(meets_slo(t, slo) for t in timings) if slo else None
    return {
        "completed": len(timings),
        "duration_s": duration,
        "total_input_tokens": sum(t.prompt_tokens for t in timings),
        "total_output_tokens": output,
        "request_throughput": len(timings) / duration,
        "output_tok_s": output / duration,
        "total_tok_s": (output + sum(t.prompt_tokens for t in timings)) / duration,
        "ttft_s": summarize([t.ttft for t in timings]),
        "tpot_s": summarize([t.tpot for t in timings if t.tpot is not None]),
        "itl_s": summarize([g for t in timings for g in t.itls]),
        "e2e_s": summarize([t.e2e for t in timings]),
        "slo": dict(slo or {}),
        "goodput": good / duration if slo else None,
        "slo_attainment": good / len(timings) if slo else None,
    }
