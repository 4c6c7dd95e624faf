"""Rollout state (canary and shadow shares, rolled-back flag and reason) and the live-budget watchdog.

The state is a small JSON file written atomically to `--state-dir` on every change and read back at
start-up, so a restarted server keeps its shares and a rolled-back candidate stays rolled back until
an operator sets a canary share again (`POST /admin/rollout`).

Windows are tumbling: one closes after `window_requests` requests or `window_seconds`, and its
observations are checked against the live budget. A request enters the window once all its
observations are in: at its end, or, when it is shadowed, once its comparison is done (a comparison
dropped because the shadow queue was full leaves the request without one). `failure_limit` consecutive breached windows roll back: canary share 0, logged with
the window as evidence, counted in quantship_rollbacks_total.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..bench.metrics import percentile
from .live_budget import LiveBudget
from .shadow import ShadowResult

log = logging.getLogger("quantship.serve")
STATE_FILE = "rollout.json"


@dataclass(frozen=True)
class RolloutState:
    canary: float = 0.0  # percent of requests answered by the candidate
    shadow: float = 0.0  # percent of baseline-served requests also scored on the candidate
    rolled_back: bool = False
    reason: str | None = None
    evidence: dict | None = None
    updated: float = 0.0  # time.time()

    def __post_init__(self) -> None:
        for name in ("canary", "shadow"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{name} is a percentage in [0, 100], got {value!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RolloutState:
        known = {k: data[k] for k in ("canary", "shadow", "rolled_back", "reason", "evidence", "updated") if k in data}
        return cls(**known)


def read_state(state_dir: str | Path | None) -> RolloutState | None:
    if state_dir is None:
        return None
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        return None
    import json

    try:
        return RolloutState.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read the rollout state {path}: {e}; fix or remove it") from e


@dataclass
class Window:
    start: float = field(default_factory=time.time)
    served: int = 0
    candidate_served: int = 0
    candidate_errors: int = 0
    candidate_ttfts: list[float] = field(default_factory=list)
    shadow: list[ShadowResult] = field(default_factory=list)
    nonfinite_candidate: int = 0

    def observed(self) -> dict[str, float | None]:
        tokens = sum(r.tokens for r in self.shadow)
        return {
            "shadow_kld_mean": sum(r.kld_mean * r.tokens for r in self.shadow) / tokens if tokens else None,
            "top1_agreement": sum(r.top1_agreement * r.tokens for r in self.shadow) / tokens if tokens else None,
            "nonfinite_total": self.nonfinite_candidate,
            "error_rate": self.candidate_errors / self.candidate_served if self.candidate_served else None,
            "ttft_p95_s": percentile(self.candidate_ttfts, 95) if self.candidate_ttfts else None,
        }

    def summary(self) -> dict:
        tokens = sum(r.tokens for r in self.shadow)
        return {"start": self.start, "seconds": time.time() - self.start, "served": self.served,
                "candidate_served": self.candidate_served, "candidate_errors": self.candidate_errors,
                "shadowed": len(self.shadow), "shadow_tokens": tokens,
                "shadow_kld_max": max((r.kld_max for r in self.shadow), default=None),
                "likelihood_drift": (sum(r.loglik_candidate - r.loglik_baseline for r in self.shadow) / tokens
                                     if tokens else None),
                "observed": self.observed()}


class Rollout:
    """Thread-safe: the HTTP handlers, the shadow thread and admin calls all record here."""

    def __init__(self, state: RolloutState, budget: LiveBudget | None, state_dir: str | Path | None,
                 on_change: Callable[[RolloutState], None] = lambda s: None,
                 on_rollback: Callable[[str], None] = lambda trigger: None,
                 on_breach: Callable[[], None] = lambda: None):
        self.state = state
        self.budget = budget
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.on_change, self.on_rollback, self.on_breach = on_change, on_rollback, on_breach
        self.lock = threading.Lock()
        self.window = Window()
        self.closed: list[dict] = []  # the last closed windows (newest last), for GET /admin/rollout
        self.consecutive_breaches = 0
        self.totals = {"served": 0, "candidate_served": 0, "shadowed": 0, "windows": 0, "breached_windows": 0}
        self.started = time.time()
        self.rollback_info: dict | None = None  # time and requests from start to the automatic rollback
        self._save()
        self.on_change(self.state)

    # ----- control ------------------------------------------------------------------------------
    def set_shares(self, canary: float | None = None, shadow: float | None = None) -> RolloutState:
        with self.lock:
            changes = {"updated": time.time()}
            if canary is not None:
                changes.update(canary=canary, rolled_back=False, reason=None, evidence=None)
            if shadow is not None:
                changes["shadow"] = shadow
            self.state = replace(self.state, **changes)
            self.consecutive_breaches = 0
            self.window = Window()
            self._save()
            state = self.state
        self.on_change(state)
        log.info("rollout: canary %.4g%%, shadow %.4g%%", state.canary, state.shadow)
        return state

    def rollback(self, reason: str, evidence: dict | None = None, trigger: str = "manual") -> RolloutState:
        with self.lock:
            state = self._rollback_locked(reason, evidence, trigger)
        self.on_change(state)
        self.on_rollback(trigger)
        return state

    def _rollback_locked(self, reason: str, evidence: dict | None, trigger: str) -> RolloutState:
        self.state = replace(self.state, canary=0.0, rolled_back=True, reason=reason, evidence=evidence,
                             updated=time.time())
        self.consecutive_breaches = 0
        if self.rollback_info is None:
            self.rollback_info = {"trigger": trigger, "seconds_since_start": time.time() - self.started,
                                  "served_requests": self.totals["served"] + self.window.served,
                                  "shadowed_requests": self.totals["shadowed"] + len(self.window.shadow)}
        self._save()
        log.warning("rollout: ROLLBACK (%s): %s; evidence: %s", trigger, reason, evidence)
        return self.state

    def _save(self) -> None:
        if self.state_dir is not None:
            from ..fsutil import atomic_write_json

            self.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.state_dir / STATE_FILE, self.state.to_json())

    # ----- observations -------------------------------------------------------------------------
    def record_request(self, role: str, *, ttft: float | None, error: bool, shadow: ShadowResult | None = None) -> None:
        """One finished request, with its shadow comparison when it had one: a shadowed request enters the
        window when its comparison is done, so a window of N requests holds N requests' observations."""
        def add(w: Window) -> None:
            _served(w, role, ttft, error)
            if shadow is not None:
                w.shadow.append(shadow)
                w.nonfinite_candidate += shadow.nonfinite_candidate
        self._record(add)

    def record_nonfinite(self, role: str, count: int) -> None:
        if role == "candidate" and count:
            self._record(lambda w: setattr(w, "nonfinite_candidate", w.nonfinite_candidate + count))

    def _record(self, update: Callable[[Window], None]) -> None:
        rolled = None
        with self.lock:
            update(self.window)
            w, b = self.window, self.budget
            full = b is not None and (w.served >= b.window_requests or
                                      (b.window_seconds is not None and time.time() - w.start >= b.window_seconds))
            if full or (b is None and w.served >= 32):
                rolled = self._close_window()
        if rolled is not None:
            self.on_change(rolled)
            self.on_rollback("budget")

    def _close_window(self) -> RolloutState | None:
        w, b = self.window, self.budget
        summary = w.summary()
        breaches = b.check(summary["observed"]) if b is not None else []
        summary["breaches"] = breaches
        self.totals["served"] += w.served
        self.totals["candidate_served"] += w.candidate_served
        self.totals["shadowed"] += len(w.shadow)
        self.totals["windows"] += 1
        self.closed = [*self.closed[-9:], summary]
        self.window = Window()
        if not breaches:
            self.consecutive_breaches = 0
            return None
        self.totals["breached_windows"] += 1
        self.on_breach()
        self.consecutive_breaches += 1
        log.warning("rollout: live budget breached (%d/%d): %s", self.consecutive_breaches, b.failure_limit,
                    "; ".join(breaches))
        if self.consecutive_breaches >= b.failure_limit and not self.state.rolled_back:
            reason = (f"live budget breached in {self.consecutive_breaches} consecutive window(s): "
                      + "; ".join(breaches))
            return self._rollback_locked(reason, summary, "budget")
        return None

    def snapshot(self) -> dict:
        with self.lock:
            return {"state": self.state.to_json(), "budget": self.budget.to_json() if self.budget else None,
                    "current_window": self.window.summary(), "closed_windows": list(self.closed),
                    "consecutive_breaches": self.consecutive_breaches, "totals": dict(self.totals),
                    "rollback": self.rollback_info}


def _served(w: Window, role: str, ttft: float | None, error: bool) -> None:
    w.served += 1
    if role == "candidate":
        w.candidate_served += 1
        w.candidate_errors += int(error)
        if ttft is not None:
            w.candidate_ttfts.append(ttft)
