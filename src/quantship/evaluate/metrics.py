"""Baseline vs candidate over fixed windows: perplexity and KL-divergence statistics.

As llama.cpp's `llama-perplexity --kl-divergence`: the text is cut into non-overlapping
windows of `ctx` tokens and only the second half of each window is scored, so every scored
token sees at least ctx/2 tokens of context. Per scored token we keep only scalars
(KL, nll of both, p(correct) of both, top-1 agreement); baseline logits are computed window
batch by window batch and dropped, never stored whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..specs import EvalSpec
from .stats import ece_from_top1


@dataclass
class TokenStats:
    """Per scored token arrays, appended window by window."""

    kl: list[np.ndarray] = field(default_factory=list)
    nll_base: list[np.ndarray] = field(default_factory=list)
    nll_cand: list[np.ndarray] = field(default_factory=list)
    top1_same: list[np.ndarray] = field(default_factory=list)
    top1_base_correct: list[np.ndarray] = field(default_factory=list)
    p_base_max: list[np.ndarray] = field(default_factory=list)
    top1_cand_correct: list[np.ndarray] = field(default_factory=list)
    p_cand_max: list[np.ndarray] = field(default_factory=list)

    def add(self, **arrays: torch.Tensor) -> None:
        for name, value in arrays.items():
            getattr(self, name).append(value.detach().double().numpy().reshape(-1))

    def cat(self, name: str) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts) if parts else np.zeros(0)


def make_windows(token_ids: list[int], ctx: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows (n, ctx) of a token stream; the tail shorter than ctx is dropped."""
    n = len(token_ids) // ctx
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of ctx={ctx}; "
                         f"give more text or a smaller --ctx")
    return torch.tensor(token_ids[: n * ctx], dtype=torch.long).view(n, ctx)


@torch.inference_mode()
def score_windows(baseline, candidate, windows: torch.Tensor, spec: EvalSpec, *, desc: str = "eval",
                  progress: bool = True, stats: TokenStats | None = None) -> TokenStats:
    """Run both models window batch by window batch and accumulate per-token statistics."""
    stats = stats or TokenStats()
    first = spec.ctx // 2  # positions >= first are scored: predictions of tokens first+1 .. ctx-1
    for start in tqdm(range(0, len(windows), spec.batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + spec.batch_size]
        targets = batch[:, first + 1 :]  # (B, T)
        logp_base = _scored_logprobs(baseline, batch, first)  # (B, T, V)
        logp_cand = _scored_logprobs(candidate, batch, first)
        p_base = logp_base.exp()
        kl = (p_base * (logp_base - logp_cand)).sum(-1).clamp_min(0.0)  # (B, T)
        lp_base_t = logp_base.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lp_cand_t = logp_cand.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        base_top = logp_base.max(-1)
        cand_top = logp_cand.max(-1)
        stats.add(
            kl=kl, nll_base=-lp_base_t, nll_cand=-lp_cand_t,
            top1_same=(base_top.indices == cand_top.indices).float(),
            top1_base_correct=(base_top.indices == targets).float(), p_base_max=base_top.values.exp(),
            top1_cand_correct=(cand_top.indices == targets).float(), p_cand_max=cand_top.values.exp(),
        )
        del logp_base, logp_cand, p_base
    return stats


def _scored_logprobs(model, batch: torch.Tensor, first: int) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits  # (B, ctx, V)
    return torch.log_softmax(logits[:, first:-1].float(), dim=-1)


def summarize(stats: TokenStats) -> dict:
    """The llama.cpp KLD statistics, named as the JSON keys quantship reports."""
    kl = stats.cat("kl")
    nll_b, nll_c = stats.cat("nll_base"), stats.cat("nll_cand")
    dp = np.exp(-nll_c) - np.exp(-nll_b)  # Δp = p_cand(correct) - p_base(correct)
    n = len(kl)
    if n == 0:
        raise ValueError("no token was scored")
    ppl_b, ppl_c = math.exp(nll_b.mean()), math.exp(nll_c.mean())
    # standard error of ln(PPL_cand/PPL_base) from the paired per-token nll differences
    diff = nll_c - nll_b
    return {
        "tokens": int(n),
        "ppl": {"baseline": ppl_b, "candidate": ppl_c,
                "ln_ratio": float(diff.mean()), "ln_ratio_stderr": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0},
        "kld": {
            "mean": float(kl.mean()),
            "stderr": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            "median": float(np.median(kl)),
            "p90": float(np.percentile(kl, 90)),
            "p99": float(np.percentile(kl, 99)),
            "p99_9": float(np.percentile(kl, 99.9)),
            "max": float(kl.max()),
        },
        "top1_agreement": float(stats.cat("top1_same").mean()),
        # expected calibration error of next-token top-1 predictions (15 reliability bins)
        "ece": {
            "baseline": ece_from_top1(stats.cat("p_base_max"), stats.cat("top1_base_correct")).ece,
            "candidate": ece_from_top1(stats.cat("p_cand_max"), stats.cat("top1_cand_correct")).ece,
        },
        "delta_p": {
            "mean": float(dp.mean()),
            "rms": float(np.sqrt((dp**2).mean())),
            "p1": float(np.percentile(dp, 1)),
            "p5": float(np.percentile(dp, 5)),
            "median": float(np.median(dp)),
            "p95": float(np.percentile(dp, 95)),
            "p99": float(np.percentile(dp, 99)),
        },
    }
