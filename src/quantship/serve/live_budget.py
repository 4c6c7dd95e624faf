"""The live budget: limits on a rolling window of traffic that trigger an automatic rollback.

YAML, the same flat style as the release gate's budget (every term optional):

    shadow_kld_mean: 0.5     # max: mean per-token KL(P_baseline || P_candidate) over the window's shadowed tokens
    top1_agreement: 0.9      # min: share of shadowed positions with the same most likely token
    nonfinite_total: 0       # max: candidate positions with NaN/Inf logits (served or shadow-scored) in the window
    error_rate: 0.01         # max: candidate-served requests that failed or fell back / candidate-served requests
    ttft_p95_s: 2.0          # max: p95 time to first token of candidate-served requests (seconds)
    window_requests: 32      # a window closes after this many served requests ...
    window_seconds: 60       # ... or this many seconds, whichever comes first (omit: requests only)
    failure_limit: 1         # consecutive breached windows that roll back

Defaults: window_requests 32, no time limit, failure_limit 1. A term with no data in a window (no
shadowed request, no candidate-served request) is not checked in that window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

MAX_TERMS = ("shadow_kld_mean", "nonfinite_total", "error_rate", "ttft_p95_s")
MIN_TERMS = ("top1_agreement",)


@dataclass(frozen=True)
class LiveBudget:
    shadow_kld_mean: float | None = None
    top1_agreement: float | None = None
    nonfinite_total: int | None = None
    error_rate: float | None = None
    ttft_p95_s: float | None = None
    window_requests: int = 32
    window_seconds: float | None = None
    failure_limit: int = 1

    def __post_init__(self) -> None:
        for name in (*MAX_TERMS, *MIN_TERMS):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"live budget term {name} must be a number >= 0, got {value!r}")
        for name in ("top1_agreement", "error_rate"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ValueError(f"live budget term {name} is a share in [0, 1], got {value!r}")
        if not isinstance(self.window_requests, int) or self.window_requests < 1:
            raise ValueError(f"window_requests must be an integer >= 1, got {self.window_requests!r}")
        if self.window_seconds is not None and not (isinstance(self.window_seconds, (int, float))
                                                    and self.window_seconds > 0):
            raise ValueError(f"window_seconds must be a number > 0, got {self.window_seconds!r}")
        if not isinstance(self.failure_limit, int) or self.failure_limit < 1:
            raise ValueError(f"failure_limit must be an integer >= 1, got {self.failure_limit!r}")

    @property
    def terms(self) -> dict[str, float]:
        return {n: getattr(self, n) for n in (*MAX_TERMS, *MIN_TERMS) if getattr(self, n) is not None}

    def check(self, observed: dict[str, float | None]) -> list[str]:
        """-> the breached terms, each as 'name observed vs limit'; terms without data are skipped."""
        breaches = []
        for name, limit in self.terms.items():
            value = observed.get(name)
            if value is None:
                continue
            if (name in MIN_TERMS and value < limit) or (name in MAX_TERMS and value > limit):
                op = ">=" if name in MIN_TERMS else "<="
                breaches.append(f"{name} {value:.6g} (limit {op} {limit:g})")
        return breaches

    def to_json(self) -> dict:
        return asdict(self)


def parse_live_budget(data) -> LiveBudget:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"a live budget is a mapping of terms, got {type(data).__name__}")
    valid = [f.name for f in fields(LiveBudget)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown live budget term(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return LiveBudget(**{k: _number(v) for k, v in data.items()})


def _number(value):
    """YAML 1.1 (PyYAML) reads `1e-6` (no dot) as a string: take such strings as the numbers they spell."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_live_budget(path: str | Path) -> LiveBudget:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the live budget {path}: {e}") from e
    try:
        return parse_live_budget(data)
    except ValueError as e:
        raise ValueError(f"live budget {path}: {e}") from e
