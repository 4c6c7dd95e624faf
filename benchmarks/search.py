"""Mixed-precision search vs uniform schemes and a llama.cpp-style rule mix, on held-out text.

    PYTHONPATH=src python benchmarks/search.py [--model smollm2-135m] [--max-bpw 4.25] [--method rtn]
        [--ctx 256] [--max-windows 8] [--validate-blocks 0,29] [--json docs/results/search.json]

1. `run_search` (default ladder w8,w4g64,nf4g64,w3g64, Fisher sensitivity on 8 x 128 calibration
   tokens from the calibration splits) under --max-bpw; its wall time.
2. Every candidate scored on the news corpus's EVAL split (articles 0..149; the calibration split
   the search saw is articles 150..299 plus HumanEval's calibration half): the float model's
   log-probs are computed once, each candidate's KLD and perplexity on the second half of each
   window (as `quantship eval`). Candidates: the search's mix; the uniform schemes at <= the
   budget (w4g64, nf4g64, w4); the llama.cpp Q4_K_M rule mapped onto the ladder (attn_v and
   ffn_down of the layers its use_more_bits picks at w8, the rest w4g64: more bits than the
   budget) and the same rule at equal bits (those layers at w8, gate/up at w3g64, the rest w4g64).
3. Validation of the Fisher proxy: the measured per-group KLD (only that group quantized) for the
   groups of --validate-blocks at every rung, against the proxy: Spearman rank correlation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

# this folder holds kernels.py, which would shadow the `kernels` package transformers imports
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "src"))

from quantship import api  # noqa: E402
from quantship.evaluate.compare import load_texts  # noqa: E402
from quantship.evaluate.metrics import TokenStats, make_windows, summarize  # noqa: E402
from quantship.search import SearchSpec, run_search  # noqa: E402


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers whose attn_v / ffn_down Q4_K_M keeps
    at Q6_K: the first and last eighth of the layers, and every third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def rule_overrides(n_layers: int, equal_bits: bool) -> list[tuple[str, str]]:
    picked = [i for i in range(n_layers) if use_more_bits(i, n_layers)]
    layers = "|".join(map(str, picked))
    overrides = []
    if equal_bits:
        overrides.append((r"mlp\.(gate_proj|up_proj)$", "w3g64"))
    overrides.append((rf"\.layers\.({layers})\.(self_attn\.v_proj|mlp\.down_proj)$", "w8"))
    return overrides


class Scorer:
    """Held-out windows; the float model's scored log-probs computed once."""

    def __init__(self, model, tokenizer, ctx: int, max_windows: int, batch: int = 4):
        text = load_texts(["news"])["news"]
        self.windows = make_windows(tokenizer(text, add_special_tokens=False)["input_ids"], ctx, max_windows)
        self.first, self.batch = ctx // 2, batch
        self.base = [self._logp(model, self.windows[i: i + batch]) for i in range(0, len(self.windows), batch)]

    @torch.inference_mode()
    def _logp(self, model, batch):
        logits = model(input_ids=batch, use_cache=False).logits
        return torch.log_softmax(logits[:, self.first:-1].float(), dim=-1)

    @torch.inference_mode()
    def score(self, model) -> dict:
        stats = TokenStats()
        for k, i in enumerate(range(0, len(self.windows), self.batch)):
            batch = self.windows[i: i + self.batch]
            targets = batch[:, self.first + 1:]
            lb, lc = self.base[k], self._logp(model, batch)
            kl = (lb.exp() * (lb - lc)).sum(-1).clamp_min(0.0)
            bt, ct = lb.max(-1), lc.max(-1)
            stats.add(kl=kl, nll_base=-lb.gather(-1, targets[..., None])[..., 0],
                      nll_cand=-lc.gather(-1, targets[..., None])[..., 0],
                      top1_same=(bt.indices == ct.indices).float(), top1_base_correct=(bt.indices == targets).float(),
                      p_base_max=bt.values.exp(), top1_cand_correct=(ct.indices == targets).float(),
                      p_cand_max=ct.values.exp())
        return summarize(stats)


def bpw_of(result) -> float:
    mods = result.modules.values()
    return sum(m["bits_per_weight"] * m["shape"][0] * m["shape"][1] for m in mods) / \
        sum(m["shape"][0] * m["shape"][1] for m in mods)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-bpw", type=float, default=4.25)
    p.add_argument("--method", default="rtn")
    p.add_argument("--ladder", default=",".join(SearchSpec.__dataclass_fields__["ladder"].default))
    p.add_argument("--only-mix", action="store_true", help="score only the search's mix (the anchors from another run)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--validate-blocks", default="0,29", help="blocks whose groups validate the proxy ('' = skip)")
    p.add_argument("--validate-samples", type=int, default=4)
    p.add_argument("--validate-rungs", default="w4g64,nf4g64,w3g64", help="rungs measured in the validation")
    p.add_argument("--over-budget-rule", action="store_true",
                   help="also score the Q4_K_M-like rule mix without the gate/up demotion (more bits than the budget)")
    p.add_argument("--json", default="docs/results/search.json")
    args = p.parse_args()
    from quantship.artifact import environment

    out: dict = {"command": "python benchmarks/search.py " + " ".join(sys.argv[1:]), "environment": environment(),
                 "load_average_at_start": list(os.getloadavg())}

    def save():
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    spec = SearchSpec(model=args.model, max_bpw=args.max_bpw, method=args.method, ladder=tuple(args.ladder.split(",")))
    started = time.perf_counter()
    found = run_search(spec, progress=False)
    out["search"] = {"wall_s": round(time.perf_counter() - started, 1), "timings": found.timings,
                     "groups": len(found.groups), "layers": sum(len(g.layers) for g in found.groups),
                     "iterations": found.to_json()["iterations"], "final": found.to_json()["final"]}
    save()

    model, tokenizer = api.load(args.model)
    scorer = Scorer(model, tokenizer, args.ctx, args.max_windows)
    n_layers = model.config.num_hidden_layers
    default, overrides = found.overrides
    candidates = {
        "search mix": (default, list(overrides)),
        "w4g64": ("w4g64", []), "nf4g64": ("nf4g64", []), "w4": ("w4", []),
        "llama.cpp rule, equal bits": ("w4g64", rule_overrides(n_layers, True)),
    }
    if args.only_mix:
        candidates = {"search mix": candidates["search mix"]}
    if args.over_budget_rule:
        candidates["llama.cpp rule (Q4_K_M-like)"] = ("w4g64", rule_overrides(n_layers, False))
    out["eval"] = {"text": "news eval split", "ctx": args.ctx, "max_windows": args.max_windows,
                   "scored_tokens": len(scorer.windows) * (args.ctx - args.ctx // 2 - 1), "rows": {}}
    for name, (scheme, ov) in candidates.items():
        q = found.quantized if name == "search mix" else api.quantize(
            (model, tokenizer), scheme, method=args.method, overrides=ov, source=found.source, progress=False)
        s = scorer.score(q.model)
        out["eval"]["rows"][name] = {"scheme": scheme, "overrides": [list(o) for o in ov], "bpw": round(bpw_of(q), 4),
                                     "kld_mean": s["kld"]["mean"], "kld_p99": s["kld"]["p99"],
                                     "ppl": s["ppl"]["candidate"], "ppl_baseline": s["ppl"]["baseline"],
                                     "top1": s["top1_agreement"]}
        print(name, out["eval"]["rows"][name], flush=True)
        del q
        save()
    rows = out["eval"]["rows"]
    anchors = [r for n, r in rows.items() if n != "search mix" and r["bpw"] <= args.max_bpw + 1e-9]
    if anchors:
        best = min(anchors, key=lambda r: r["kld_mean"])
        out["eval"]["ratio_to_best_anchor_at_budget"] = rows["search mix"]["kld_mean"] / best["kld_mean"]
        save()

    if args.validate_blocks:
        from quantship.calib import build_calibration
        from quantship.methods.registry import get_method
        from quantship.models.arch import arch_facts
        from quantship.pipeline import find_targets
        from quantship.search.sensitivity import Reference, kld_table
        from quantship.specs import QuantSpec

        blocks = {int(b) for b in args.validate_blocks.split(",")}
        qs = QuantSpec(scheme="w8", calib_samples=args.validate_samples, calib_seqlen=spec.calib_seqlen)
        targets = find_targets(model, arch_facts(model.config.model_type), qs)
        idx = [g for g, grp in enumerate(found.groups) if int(re.search(r"\.(\d+)\.", grp.name)[1]) in blocks]
        groups = [found.groups[g] for g in idx]
        t0 = time.perf_counter()
        ref = Reference(model, build_calibration(qs, model, tokenizer).tokens)
        rtn = get_method("rtn")
        from quantship.formats.scheme import parse_scheme
        rungs = [r for r in found.rungs if r in args.validate_rungs.split(",")]
        cols = [found.rungs.index(r) for r in rungs]
        measured = kld_table(model, targets, groups, [parse_scheme(r) for r in rungs], ref,
                             rtn.quantize_weight, rtn.make_params({}), progress=False)
        proxy = [[found.loss[g][c] for c in cols] for g in idx]
        a = [v for row in measured for v in row]
        b = [v for row in proxy for v in row]
        within = [spearman(m, f) for m, f in zip(zip(*measured), zip(*proxy))]  # per rung, across groups
        out["validation"] = {"blocks": sorted(blocks), "groups": [g.name for g in groups], "rungs": rungs,
                             "calib_tokens": args.validate_samples * spec.calib_seqlen,
                             "measured": measured, "proxy": proxy, "spearman_all": spearman(a, b),
                             "spearman_per_rung": dict(zip(rungs, within)),
                             "measured_forwards": len(groups) * len(rungs),
                             "wall_s": round(time.perf_counter() - t0, 1)}
        print("validation", out["validation"]["spearman_all"], out["validation"]["spearman_per_rung"], flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
