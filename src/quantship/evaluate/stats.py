"""Paired statistics for baseline-vs-candidate comparisons, and calibration error.

Every function here is pure (numpy in, numbers out) except `ECEAccumulator`, which is a
streaming accumulator with an explicit lifecycle (`update` ... `result`) so it can be fed
chunk by chunk from a perplexity loop without keeping logits.

Definitions (see docs/evaluation.md):

- delta = mean(candidate) - mean(baseline) over the same items (paired).
- Paired bootstrap CI: resample item indices with replacement (the same indices for both
  arms), take the mean difference per resample, report the 2.5th/97.5th percentiles.
- Exact McNemar test: under H0 a discordant item is equally likely to flip either way, so
  the pass->fail count b ~ Binomial(b + c, 1/2); the two-sided p-value is
  min(1, 2 * P[X <= min(b, c)]) (p = 1 when there are no discordant items).
- ECE (Guo et al. 2017): confidences split into `n_bins` equal-width bins on [0, 1]
  (bin i holds (i/n, (i+1)/n], bin 0 also holds 0); ECE = sum_i |B_i|/N * |acc(B_i) - conf(B_i)|.
  MCE is the max over non-empty bins of |acc - conf|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Flips", "flip_counts", "paired_bootstrap_ci", "mcnemar_exact", "ReliabilityBin", "Calibration",
    "expected_calibration_error", "ece_from_top1", "ECEAccumulator",
]


def _as_bool_pairs(baseline, candidate) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(baseline, dtype=float).reshape(-1)
    b = np.asarray(candidate, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays must have the same length: baseline has {a.size}, candidate "
                         f"has {b.size}; pass one score per item for both models, in the same item order")
    return a, b


@dataclass(frozen=True)
class Flips:
    """Per-item agreement of two pass/fail vectors over the same items."""

    pass_to_fail: int  # baseline passed, candidate failed  (b in McNemar's table)
    fail_to_pass: int  # baseline failed, candidate passed  (c)
    both_pass: int
    both_fail: int

    def as_dict(self) -> dict:
        return {"pass_to_fail": self.pass_to_fail, "fail_to_pass": self.fail_to_pass}


def flip_counts(baseline_pass, candidate_pass) -> Flips:
    """Count the 2x2 table of paired pass/fail outcomes."""
    a, b = _as_bool_pairs(baseline_pass, candidate_pass)
    a, b = a.astype(bool), b.astype(bool)
    return Flips(pass_to_fail=int((a & ~b).sum()), fail_to_pass=int((~a & b).sum()),
                 both_pass=int((a & b).sum()), both_fail=int((~a & ~b).sum()))


def paired_bootstrap_ci(baseline, candidate, *, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(candidate - baseline), resampling items (paired).

    Deterministic for a given seed. With a single item (or none) the interval collapses to
    the observed difference.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    a, b = _as_bool_pairs(baseline, candidate)
    d = b - a  # (N,) per-item paired differences
    n = d.size
    if n == 0:
        return (0.0, 0.0)
    if n == 1:
        return (float(d[0]), float(d[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, N) resampled item indices
    means = d[idx].mean(axis=1)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def mcnemar_exact(pass_to_fail: int, fail_to_pass: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c."""
    b, c = int(pass_to_fail), int(fail_to_pass)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    try:
        from scipy.stats import binomtest  # optional; same number, faster for huge n
    except ImportError:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n if n <= 1000 else _log_tail(n, k)
        return float(min(1.0, 2.0 * tail))
    return float(binomtest(b, n, 0.5, alternative="two-sided").pvalue)


def _log_tail(n: int, k: int) -> float:
    """P[X <= k] for X ~ Bin(n, 1/2) in log space (avoids 2**n overflow for large n)."""
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
            for i in range(k + 1)]
    m = max(logs)
    return math.exp(m) * sum(math.exp(x - m) for x in logs)


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBin:
    lo: float
    hi: float
    count: int
    confidence: float  # mean confidence in the bin (0 when empty)
    accuracy: float  # fraction correct in the bin (0 when empty)


@dataclass(frozen=True)
class Calibration:
    ece: float
    mce: float
    n: int
    bins: tuple[ReliabilityBin, ...]

    def as_dict(self) -> dict:
        return {"ece": self.ece, "mce": self.mce, "n": self.n,
                "bins": [vars(b).copy() for b in self.bins]}


PROB_TOL = 1e-4  # float32 rounding of exp(log p) around 0 and 1


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # bin i holds (i/n, (i+1)/n]; 0 goes to bin 0
    return np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


class ECEAccumulator:
    """Streaming reliability-bin sums: feed chunks, read `result()` at any time.

    Binning is fixed in advance, so the streamed result equals the one-shot
    `expected_calibration_error` on the concatenated inputs exactly.
    """

    def __init__(self, n_bins: int = 15):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self._count = np.zeros(n_bins, dtype=np.int64)
        self._conf = np.zeros(n_bins, dtype=np.float64)
        self._correct = np.zeros(n_bins, dtype=np.float64)

    def update(self, confidence, correct) -> None:
        """Add per-prediction confidences in [0, 1] and 0/1 correctness."""
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        corr = np.asarray(correct, dtype=np.float64).reshape(-1)
        if conf.shape != corr.shape:
            raise ValueError(f"confidence has {conf.size} values but correct has {corr.size}; "
                             f"give one correctness flag per confidence")
        if conf.size and (np.isnan(conf).any() or conf.min() < -PROB_TOL or conf.max() > 1.0 + PROB_TOL):
            raise ValueError("confidences must be probabilities in [0, 1]; pass softmax probabilities, "
                             "not logits (or use update_logits)")
        conf = np.clip(conf, 0.0, 1.0)  # exp(log_softmax) can round to 1 + 1e-7
        idx = _bin_index(conf, self.n_bins)
        self._count += np.bincount(idx, minlength=self.n_bins)
        self._conf += np.bincount(idx, weights=conf, minlength=self.n_bins)
        self._correct += np.bincount(idx, weights=corr, minlength=self.n_bins)

    def update_logits(self, logits, targets) -> None:
        """Add next-token predictions: logits (..., V) and integer targets (...).

        Confidence is the top-1 softmax probability, correct is argmax == target. Accepts torch
        tensors or numpy arrays; computes in float32 / float64 without keeping the logits.
        """
        import torch

        if isinstance(logits, torch.Tensor):
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                top = probs.max(dim=-1)
                t = torch.as_tensor(targets, device=top.indices.device)
                if t.shape != top.indices.shape:
                    raise ValueError(f"targets shape {tuple(t.shape)} does not match logits "
                                     f"{tuple(logits.shape)} minus the vocab dim")
                self.update(top.values.cpu().double().numpy(), (top.indices == t).cpu().numpy())
            return
        x = np.asarray(logits, dtype=np.float64)
        t = np.asarray(targets)
        if t.shape != x.shape[:-1]:
            raise ValueError(f"targets shape {t.shape} does not match logits {x.shape} minus the vocab dim")
        x = x - x.max(axis=-1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(axis=-1, keepdims=True)
        self.update(p.max(axis=-1), p.argmax(axis=-1) == t)

    @property
    def n(self) -> int:
        return int(self._count.sum())

    def result(self) -> Calibration:
        n = self.n
        if n == 0:
            raise RuntimeError("ECEAccumulator.result() called before any update(); feed predictions first")
        bins, ece, mce = [], 0.0, 0.0
        for i in range(self.n_bins):
            c = int(self._count[i])
            conf = self._conf[i] / c if c else 0.0
            acc = self._correct[i] / c if c else 0.0
            if c:
                gap = abs(acc - conf)
                ece += c / n * gap
                mce = max(mce, gap)
            bins.append(ReliabilityBin(lo=i / self.n_bins, hi=(i + 1) / self.n_bins, count=c,
                                       confidence=float(conf), accuracy=float(acc)))
        return Calibration(ece=float(ece), mce=float(mce), n=n, bins=tuple(bins))


def expected_calibration_error(confidence, correct, *, n_bins: int = 15) -> Calibration:
    """ECE / MCE and the reliability bins of confidences in [0, 1] against 0/1 correctness."""
    acc = ECEAccumulator(n_bins)
    acc.update(confidence, correct)
    return acc.result()


def ece_from_top1(top1_prob, top1_correct, *, n_bins: int = 15) -> Calibration:
    """ECE of next-token predictions: top-1 probability and whether argmax == target.

    These are the `p_base_max` / `top1_base_correct` (or cand) arrays the perplexity loop keeps.
    """
    return expected_calibration_error(top1_prob, top1_correct, n_bins=n_bins)
