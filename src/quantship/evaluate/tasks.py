"""Task suites on a baseline and a candidate, with paired statistics.

    results = run_suites((base_model, tok), (cand_model, tok), ["math", "qa"], limit=10, out_dir="eval/")
    results["math"] == {"baseline": 0.41, "candidate": 0.38, "delta": -0.03, "ci95": [-0.09, 0.03],
                        "p_value": 0.5, "significant": False, "flips": {"pass_to_fail": 3, "fail_to_pass": 2},
                        "n": 32, "content_hash": "…", "worst_flips": [...]}

Both models see the same items with the same greedy decoding; each output is checked by the
item's checker; pass rates are compared item by item (paired bootstrap CI of the difference,
exact McNemar p-value on the discordant items). See docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..fsutil import atomic_write_text, canonical_json
from .checkers import CheckResult, check
from .fastpath import dequantized_once
from .generate import DEFAULT_BATCH_SIZE, generate
from .stats import flip_counts, mcnemar_exact, paired_bootstrap_ci
from .suites import (GENERATION_SUITES, SCORING_SUITES, Item, Suite, SuiteContext, load_jsonl, load_suite,
                     multilingual_texts, score_slices)

ALPHA = 0.05
N_BOOT = 2000
WORST_FLIPS = 5
DEFAULT_MAX_CONTEXT = 2048


def _check_safely(item: Item, output: str) -> CheckResult:
    try:
        return check(item.checker, output, item)
    except ValueError as e:  # a malformed item is a data error: say which item
        raise ValueError(f"item {item.id!r}: {e}") from e


def _max_context(model) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    return int(min(n, DEFAULT_MAX_CONTEXT))


def _resolve(suites: Sequence[str], suite_files: Sequence[str | Path], full: bool, ctx: SuiteContext,
             limit: int | None) -> list[Suite]:
    out: list[Suite] = []
    for name in suites:
        if name in SCORING_SUITES:
            continue
        out.append(load_suite(name, full=full, context=ctx))
    for path in suite_files:
        s = load_jsonl(path)
        if s.name in GENERATION_SUITES or s.name in SCORING_SUITES or s.name in {x.name for x in out}:
            s = Suite(f"file:{s.name}", s.items, s.description)
        out.append(s)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (items per suite) or None, got {limit}")
        out = [Suite(s.name, s.items[:limit], s.description) for s in out]
    return out


def compare(base_pass: Sequence[bool], cand_pass: Sequence[bool], *, seed: int = 0) -> dict:
    """The per-suite statistics of two paired pass/fail vectors."""
    a = np.asarray(base_pass, dtype=float)
    b = np.asarray(cand_pass, dtype=float)
    flips = flip_counts(a, b)
    lo, hi = paired_bootstrap_ci(a, b, n_boot=N_BOOT, seed=seed)
    p = mcnemar_exact(flips.pass_to_fail, flips.fail_to_pass)
    return {
        "baseline": float(a.mean()) if a.size else 0.0,
        "candidate": float(b.mean()) if b.size else 0.0,
        "delta": float((b - a).mean()) if a.size else 0.0,
        "ci95": [lo, hi],
        "p_value": p,
        "significant": bool((lo > 0 or hi < 0) and p < ALPHA),
        "flips": flips.as_dict(),
        "n": int(a.size),
    }


def content_hash(records: list[dict]) -> str:
    """sha256 of the canonical JSON of per-item records."""
    return hashlib.sha256(canonical_json(records).encode("utf-8")).hexdigest()


def _run_suite(suite: Suite, baseline, candidate, *, seed: int, batch_size: int, progress: bool) -> tuple[dict, list[dict]]:
    items = list(suite.items)
    outs = {}
    for arm, (model, tok) in (("baseline", baseline), ("candidate", candidate)):
        outs[arm] = generate(model, tok, items, batch_size=batch_size, progress=progress, desc=f"{suite.name} {arm}")
    records = []
    for i, item in enumerate(items):
        rb = _check_safely(item, outs["baseline"][i])
        rc = _check_safely(item, outs["candidate"][i])
        records.append({
            "suite": suite.name, "id": item.id, "checker": item.checker,
            "prompt": item.prompt if item.prompt is not None else list(item.messages),
            "baseline_output": outs["baseline"][i], "candidate_output": outs["candidate"][i],
            "baseline_pass": rb.passed, "candidate_pass": rc.passed,
            "baseline_detail": rb.detail, "candidate_detail": rc.detail,
        })
    result = compare([r["baseline_pass"] for r in records], [r["candidate_pass"] for r in records], seed=seed)
    result["content_hash"] = content_hash(records)
    result["worst_flips"] = [_flip_summary(r) for r in records if r["baseline_pass"] and not r["candidate_pass"]][:WORST_FLIPS]
    if suite.name == "refusal":
        result.update(_refusal_behaviour(records))
    return result, records


def _flip_summary(r: dict, width: int = 160) -> dict:
    prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
    return {"id": r["id"], "prompt": prompt[-width:], "baseline_output": r["baseline_output"][:width],
            "candidate_output": r["candidate_output"][:width], "candidate_detail": r["candidate_detail"]}


def _refusal_behaviour(records: list[dict]) -> dict:
    """Refusal rate of each model and how often the candidate behaves like the baseline."""
    from .checkers.text import is_refusal

    rb = [is_refusal(r["baseline_output"])[0] for r in records]
    rc = [is_refusal(r["candidate_output"])[0] for r in records]
    n = len(records)
    return {"refusal_rate": {"baseline": sum(rb) / n, "candidate": sum(rc) / n},
            "behaviour_agreement": sum(x == y for x, y in zip(rb, rc)) / n}


def _run_all(baseline, candidate, suites, resolved, *, seed, limit, out_dir, progress, results) -> None:
    for suite in resolved:
        result, records = _run_suite(suite, baseline, candidate, seed=seed, batch_size=DEFAULT_BATCH_SIZE,
                                     progress=progress)
        results[suite.name] = result
        if out_dir is not None:
            lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
            atomic_write_text(Path(out_dir) / f"tasks-{suite.name.replace(':', '-')}.jsonl", lines)
    if "multilingual" in suites:
        texts = multilingual_texts()
        if limit is not None:
            texts = {k: v[:limit] for k, v in texts.items()}
        slices = score_slices(lambda text: score_text_pair(baseline, candidate, text), texts)
        results["multilingual"] = {"slices": slices, "n": len(slices),
                                   "content_hash": content_hash([{"slice": k, **v} for k, v in sorted(slices.items())])}


def run_suites(baseline, candidate, suites: list[str], *, suite_files=(), full: bool = False, seed: int = 0,
               limit: int | None = None, out_dir=None) -> dict:
    """Run task suites on both (model, tokenizer) pairs; per-suite statistics keyed by suite name.

    Generation suites (and each JSONL in `suite_files`, named after its file stem) give
    {baseline, candidate, delta, ci95, p_value, significant, flips, n, content_hash, worst_flips};
    `refusal` adds refusal_rate and behaviour_agreement. `multilingual` gives
    {"slices": {slice: metrics}, "n": n_slices} from `score_text_pair`.
    With out_dir, per-item records go to out_dir/tasks-<suite>.jsonl.
    """
    if not suites and not suite_files:
        raise ValueError("no suites given; choose from " + ", ".join([*GENERATION_SUITES, *SCORING_SUITES])
                         + " or pass suite_files")
    unknown = [s for s in suites if s not in GENERATION_SUITES and s not in SCORING_SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; built-in suites: {', '.join([*GENERATION_SUITES, *SCORING_SUITES])}")
    b_model, b_tok = baseline
    c_model, c_tok = candidate
    ctx = SuiteContext(tokenizer=b_tok, max_context=min(_max_context(b_model), _max_context(c_model)), seed=seed)
    progress = True
    results: dict[str, Any] = {}
    with dequantized_once(b_model), dequantized_once(c_model):  # exact, faster decode of QuantLinear layers
        _run_all(baseline, candidate, suites, _resolve(suites, suite_files, full, ctx, limit), seed=seed,
                 limit=limit, out_dir=out_dir, progress=progress, results=results)
    return results


@torch.inference_mode()
def score_text_pair(baseline, candidate, text: str) -> dict:
    """Default per-text scorer for the multilingual slices: the whole text as one sequence.

    Every next-token prediction is scored (not llama.cpp's second-half windows: the texts are
    short). Returns tokens, mean KL(P_base || P_cand), ppl of both, top-1 agreement. The
    foundation's windowed KLD summary can be plugged in instead through `score_slices`.
    """
    (b_model, b_tok), (c_model, _) = baseline, candidate
    ids = b_tok(text, return_tensors="pt")["input_ids"][:, : _max_context(b_model)]  # (1, T)
    if ids.shape[1] < 2:
        raise ValueError(f"text too short to score ({ids.shape[1]} token)")
    lp_b = torch.log_softmax(b_model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V)
    lp_c = torch.log_softmax(c_model(input_ids=ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:].unsqueeze(-1)  # (T-1, 1)
    kl = (lp_b.exp() * (lp_b - lp_c)).sum(-1).clamp_min(0)
    nll_b, nll_c = -lp_b.gather(-1, tgt).mean().item(), -lp_c.gather(-1, tgt).mean().item()
    return {"tokens": int(tgt.shape[0]), "kld_mean": float(kl.mean()), "ppl_baseline": float(np.exp(nll_b)),
            "ppl_candidate": float(np.exp(nll_c)), "ln_ppl_ratio": float(nll_c - nll_b),
            "top1_agreement": float((lp_b.argmax(-1) == lp_c.argmax(-1)).float().mean())}


# ----------------------------------------------------------------------------- rendering

def render_tables(results: dict, *, console=None, worst: int = WORST_FLIPS) -> None:
    """Print a summary table of suites and, per suite, the worst pass->fail flips."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="Task suites: baseline vs candidate (paired)")
    for col in ("suite", "n", "baseline", "candidate", "delta", "95% CI", "McNemar p", "pass→fail", "fail→pass", ""):
        table.add_column(col, justify="right" if col not in ("suite", "") else "left")
    for name, r in results.items():
        if "slices" in r:
            continue
        lo, hi = r["ci95"]
        table.add_row(name, str(r["n"]), f"{r['baseline']:.3f}", f"{r['candidate']:.3f}", f"{r['delta']:+.3f}",
                      f"[{lo:+.3f}, {hi:+.3f}]", f"{r['p_value']:.3g}", str(r["flips"]["pass_to_fail"]),
                      str(r["flips"]["fail_to_pass"]), "significant" if r["significant"] else "")
    console.print(table)
    for name, r in results.items():
        if "slices" in r:
            st = Table(title=f"{name}: per-slice scores")
            keys = sorted({k for v in r["slices"].values() for k in v})
            st.add_column("slice")
            for k in keys:
                st.add_column(k, justify="right")
            for sl, v in r["slices"].items():
                st.add_row(sl, *[f"{v[k]:.4g}" if isinstance(v.get(k), float) else str(v.get(k, "")) for k in keys])
            console.print(st)
            continue
        flips = r.get("worst_flips", [])[:worst]
        if not flips:
            continue
        ft = Table(title=f"{name}: worst flips (baseline passed, candidate failed)")
        for col in ("id", "prompt (end)", "baseline output", "candidate output", "why"):
            ft.add_column(col, overflow="fold")
        for f in flips:
            ft.add_row(f["id"], f["prompt"][-60:], f["baseline_output"][:60], f["candidate_output"][:60],
                       f["candidate_detail"][:60])
        console.print(ft)
