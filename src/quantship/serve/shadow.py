"""Shadow comparison: both models teacher-forced on the tokens actually served.

Over an HTTP API a comparator sees ~20 top log-probabilities per token; here both models are in the
process, so the full next-token distributions give the same KL divergence offline evaluation uses:

    ids = prompt + served output                      (T,)
    logp_base, logp_cand = log_softmax(model(ids))    (T, V) each, reference forwards (no KV cache)
    scored positions: those predicting the served output tokens (prompt_len-1 .. T-2)
    KL_t = sum_v p_base(v) (logp_base(v) - logp_cand(v))            per scored position, clamped >= 0
    top1_t = argmax logp_base == argmax logp_cand
    drift  = mean_t (logp_cand(served_t) - logp_base(served_t))     likelihood of the served text

Requests are compared off the client's path: a bounded queue feeds one background thread; when the
queue is full the comparison is dropped and counted (the client never waits for the shadow).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

log = logging.getLogger("quantship.serve")


@dataclass(frozen=True)
class ShadowResult:
    served_by: str  # the role that answered the client
    tokens: int  # scored positions
    kld_mean: float
    kld_max: float
    top1_agreement: float
    loglik_baseline: float  # sum over the served tokens
    loglik_candidate: float
    nonfinite_baseline: int  # scored positions whose logits held a NaN or an infinity
    nonfinite_candidate: int
    time: float  # time.time() when done

    @property
    def drift(self) -> float:
        return (self.loglik_candidate - self.loglik_baseline) / self.tokens if self.tokens else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "likelihood_drift": self.drift}


@torch.inference_mode()
def compare_logits(logits_base: torch.Tensor, logits_cand: torch.Tensor, targets: torch.Tensor,
                   served_by: str = "baseline") -> ShadowResult:
    """logits (T, V) of both models at the scored positions, targets (T,) the served tokens -> ShadowResult."""
    nf_base = int((~torch.isfinite(logits_base).all(-1)).sum())
    nf_cand = int((~torch.isfinite(logits_cand).all(-1)).sum())
    logp_base = torch.log_softmax(logits_base.float(), -1)  # (T, V)
    logp_cand = torch.log_softmax(logits_cand.float(), -1)
    kl = (logp_base.exp() * (logp_base - logp_cand)).sum(-1).clamp_min(0.0)  # (T,)
    kl = torch.nan_to_num(kl, nan=float("inf"))  # a non-finite candidate is infinitely far
    top1 = (logp_base.argmax(-1) == logp_cand.argmax(-1)).float()
    ll_base = logp_base.gather(-1, targets[:, None]).squeeze(-1).sum()
    ll_cand = logp_cand.gather(-1, targets[:, None]).squeeze(-1).sum()
    return ShadowResult(served_by, int(targets.numel()), float(kl.mean()), float(kl.max()), float(top1.mean()),
                        float(ll_base), float(ll_cand), nf_base, nf_cand, time.time())


def compare_served(baseline, candidate, prompt_ids: list[int], output_ids: list[int],
                   served_by: str = "baseline") -> ShadowResult:
    """Teacher-force both workers (their `logits(ids)`) on prompt + output; score the output tokens."""
    ids = list(prompt_ids) + list(output_ids)
    first = len(prompt_ids) - 1  # the position predicting the first output token
    targets = torch.tensor(output_ids, dtype=torch.long)
    lb = baseline.logits(ids)[first:first + len(output_ids)]
    lc = candidate.logits(ids)[first:first + len(output_ids)]
    return compare_logits(lb, lc, targets, served_by)


@dataclass(frozen=True)
class ShadowJob:
    prompt_ids: list[int]
    output_ids: list[int]
    served_by: str
    on_done: Callable[[ShadowResult | None], None] = lambda result: None  # None: dropped or failed


class ShadowRunner:
    """One background thread draining a bounded queue of ShadowJobs into `on_result(ShadowResult)`."""

    def __init__(self, baseline, candidate, on_result: Callable[[ShadowResult], None],
                 on_drop: Callable[[str], None], maxsize: int = 64):
        self.baseline, self.candidate = baseline, candidate
        self.on_result, self.on_drop = on_result, on_drop
        self.queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.done = 0
        self.failed = 0
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="quantship-shadow", daemon=True)
        self._thread.start()

    def submit(self, job: ShadowJob) -> bool:
        """Never blocks: -> False (counted as dropped) when the queue is full."""
        if not job.output_ids:
            return False
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += 1
            self.on_drop("dropped")
            job.on_done(None)
            return False

    def pending(self) -> int:
        return self.queue.qsize() + self.busy

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.busy = True
            try:
                try:
                    result = compare_served(self.baseline, self.candidate, job.prompt_ids, job.output_ids,
                                            job.served_by)
                except Exception as e:  # noqa: BLE001 - a failed comparison is counted and logged, never fatal
                    self.failed += 1
                    log.warning("shadow comparison failed: %s: %s", type(e).__name__, e)
                    self.on_drop("failed")
                    job.on_done(None)
                else:
                    self.done += 1
                    self.on_result(result)
                    job.on_done(result)
            except Exception:  # noqa: BLE001 - a failing callback must not end the shadow thread
                log.exception("shadow result handling failed")
            finally:
                self.busy = False
