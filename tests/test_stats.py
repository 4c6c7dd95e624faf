"""Paired statistics and calibration: numbers checked by hand or against known truths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantship.evaluate.stats import (ECEAccumulator, ece_from_top1, expected_calibration_error, flip_counts,
                                      mcnemar_exact, paired_bootstrap_ci)
from quantship.evaluate.tasks import compare


# ----------------------------------------------------------------------------- McNemar

def test_mcnemar_hand_computed_table():
    # b = 1 pass->fail, c = 9 fail->pass: n = 10, P[X <= 1] = (1 + 10) / 1024, two-sided x2
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024, abs=1e-15)
    # b = 2, c = 8: (1 + 10 + 45) / 1024 * 2 = 112 / 1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024, abs=1e-15)
    # 0 vs 6: 2 / 64
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_mcnemar_edges():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0  # symmetric table: capped at 1
    assert mcnemar_exact(3, 4) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 2)


def test_mcnemar_large_n_matches_normal_approximation():
    # n = 2000, k = 900: z = (900.5 - 1000) / sqrt(500); exact and continuity-corrected normal agree closely
    p = mcnemar_exact(900, 1100)
    z = (900.5 - 1000) / math.sqrt(500)
    normal = math.erfc(-z / math.sqrt(2))  # 2 * Phi(z)
    assert p == pytest.approx(normal, rel=0.02)
    assert 1e-6 < p < 1e-5


# ----------------------------------------------------------------------------- flips

def test_flip_counts_table():
    base = [1, 1, 1, 0, 0, 0, 1]
    cand = [1, 0, 0, 1, 0, 0, 1]
    f = flip_counts(base, cand)
    assert (f.pass_to_fail, f.fail_to_pass, f.both_pass, f.both_fail) == (2, 1, 2, 2)
    assert f.as_dict() == {"pass_to_fail": 2, "fail_to_pass": 1}


def test_paired_arrays_must_match():
    with pytest.raises(ValueError, match="same length"):
        flip_counts([1, 0], [1])


# ----------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_bootstrap_ci_covers_true_delta(seed):
    rng = np.random.default_rng(100 + seed)
    n, true_delta = 400, -0.10
    base = rng.random(n) < 0.60  # pass rate 0.60
    cand = base.copy()
    # candidate loses 0.10 in expectation: each baseline pass flips to fail with probability 1/6
    cand[base & (rng.random(n) < 0.10 / 0.60)] = False
    # 99% so that a single seed misses with probability ~1%; nominal 95% coverage is tested below
    lo, hi = paired_bootstrap_ci(base, cand, seed=seed, level=0.99)
    observed = cand.mean() - base.mean()
    assert lo <= observed <= hi
    assert lo <= true_delta <= hi
    assert hi < 0  # a real regression of this size on 400 items is detected
    assert 0.03 < hi - lo < 0.12


def test_bootstrap_is_seeded_and_degenerate_cases():
    a, b = [1, 0, 1, 1, 0], [1, 1, 0, 1, 1]
    assert paired_bootstrap_ci(a, b, seed=7) == paired_bootstrap_ci(a, b, seed=7)
    assert paired_bootstrap_ci([1, 1, 0], [1, 1, 0]) == (0.0, 0.0)  # identical arms
    assert paired_bootstrap_ci([1], [0]) == (-1.0, -1.0)
    assert paired_bootstrap_ci([], []) == (0.0, 0.0)
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_ci(a, b, level=1.5)


def test_bootstrap_nominal_coverage_on_synthetic_population():
    # 200 replications: a 95% interval should cover the true delta in roughly 95% of them
    covered = 0
    for rep in range(200):
        rng = np.random.default_rng(rep)
        base = rng.random(200) < 0.5
        cand = np.where(rng.random(200) < 0.2, ~base, base)  # symmetric flips: true delta 0
        lo, hi = paired_bootstrap_ci(base, cand, n_boot=500, seed=rep)
        covered += lo <= 0.0 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_compare_significance_rule():
    base = [True] * 30 + [False] * 10
    cand = [False] * 12 + [True] * 18 + [False] * 10  # 12 pass->fail, 0 fail->pass
    r = compare(base, cand, seed=0)
    assert r["n"] == 40 and r["flips"] == {"pass_to_fail": 12, "fail_to_pass": 0}
    assert r["delta"] == pytest.approx(-0.3)
    assert r["p_value"] == pytest.approx(2 / 2**12)
    assert r["ci95"][1] < 0 and r["significant"] is True
    same = compare(base, base)
    assert same["significant"] is False and same["p_value"] == 1.0 and same["ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------- ECE

def test_ece_known_inputs():
    # 10 bins. Bin (0.7, 0.8]: four predictions at 0.75, 3 correct -> gap 0
    # Bin (0.9, 1.0]: four at 0.95, 2 correct -> gap 0.45; bin (0.2, 0.3]: two at 0.25, both wrong -> gap 0.25
    conf = [0.75] * 4 + [0.95] * 4 + [0.25] * 2
    corr = [1, 1, 1, 0] + [1, 1, 0, 0] + [0, 0]
    cal = expected_calibration_error(conf, corr, n_bins=10)
    assert cal.ece == pytest.approx(0.4 * 0.0 + 0.4 * 0.45 + 0.2 * 0.25)
    assert cal.mce == pytest.approx(0.45)
    assert cal.n == 10
    b = cal.bins[9]
    assert (b.count, b.confidence, b.accuracy) == (4, pytest.approx(0.95), 0.5)
    assert sum(x.count for x in cal.bins) == 10


def test_ece_perfect_calibration_and_bin_edges():
    # within each bin the accuracy equals the confidence exactly
    conf = [0.5] * 4 + [1.0] * 3 + [0.0] * 2
    corr = [1, 0, 1, 0] + [1, 1, 1] + [0, 0]
    cal = expected_calibration_error(conf, corr, n_bins=4)
    assert cal.ece == pytest.approx(0.0, abs=1e-12)
    assert cal.bins[0].count == 2  # 0.0 goes to the first bin
    assert cal.bins[1].count == 4  # 0.5 is in (0.25, 0.5]
    assert cal.bins[3].count == 3  # 1.0 is in (0.75, 1.0]


def test_ece_streaming_equals_one_shot_and_logits_path():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(6, 7, 11)) * 3, dtype=torch.float32)  # (B, T, V)
    targets = torch.tensor(rng.integers(0, 11, size=(6, 7)))
    probs = torch.softmax(logits, -1)
    top = probs.max(-1)
    one_shot = ece_from_top1(top.values.numpy(), (top.indices == targets).numpy(), n_bins=15)
    streaming = ECEAccumulator(15)
    for i in range(0, 6, 2):  # three chunks of two sequences
        streaming.update_logits(logits[i : i + 2], targets[i : i + 2])
    streamed = streaming.result()
    assert streamed.n == 42
    assert streamed.ece == pytest.approx(one_shot.ece, abs=1e-6)
    acc = ECEAccumulator(15)
    acc.update_logits(logits.numpy(), targets.numpy())  # numpy path
    assert acc.result().ece == pytest.approx(one_shot.ece, abs=1e-6)


def test_ece_tolerates_float_rounding_at_one():
    cal = expected_calibration_error(np.float32([1.0000001, 0.9999999]), [1, 1], n_bins=10)
    assert cal.bins[9].count == 2 and cal.ece == pytest.approx(0.0, abs=1e-6)


def test_ece_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(RuntimeError, match="before any update"):
        ECEAccumulator().result()
    with pytest.raises(ValueError, match="one correctness flag"):
        expected_calibration_error([0.5, 0.6], [1])
