"""A GGUF export run in llama.cpp (llama-cpp-python) against the quantship artifact it came from.

Two measurements, side by side in one run:
1. KL divergence against the fp32 baseline on the same windows (ctx, second half scored, the
   evaluator's own statistics): llama.cpp's logits (logits_all) of the GGUF vs quantship's exact
   forward of the artifact.
2. Greedy generation, first N tokens of P prompts: llama.cpp vs quantship's engine (fast path). At
   the first divergence, the top-2 logit margin of both runtimes says whether it is a near-tie.

    python benchmarks/export_llama_cpp.py --artifact out/w4g32 --gguf out/w4g32-gguf/model.gguf \
        [--model smollm2-135m] [--windows 8] [--ctx 512] [--tokens 32] --json docs/results/export_llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from types import SimpleNamespace

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "Here is a short recipe for pancakes:",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]


class LlamaCppModel:
    """A llama.cpp model behind the evaluator's interface: model(input_ids=(B, T)).logits -> (B, T, V)."""

    def __init__(self, path: str, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                                   n_threads=threads)

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        out = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            out.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(out))

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        self.llm.reset()
        tokens, logits = [], []
        seq = list(ids)
        for _ in range(n):
            self.llm.eval(seq[self.llm.n_tokens:])
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            tok = int(row.argmax())
            tokens.append(tok)
            logits.append(row)
            seq.append(tok)
        return tokens, logits


def _margin(logits) -> float:
    top = torch.as_tensor(logits).float().topk(2).values
    return float(top[0] - top[1])


def main() -> None:
    from quantship.artifact import load_artifact
    from quantship.engine import Engine, SamplingParams
    from quantship.evaluate.compare import load_texts
    from quantship.evaluate.metrics import make_windows, score_windows, summarize
    from quantship.models.load import load_model
    from quantship.specs import EvalSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.model)
    cand = load_artifact(args.artifact)
    tok = cand[1]
    text = load_texts(None)
    name, body = next(iter(text.items()))
    windows = make_windows(tok(body, add_special_tokens=False)["input_ids"], args.ctx, args.windows)
    spec = EvalSpec(ctx=args.ctx, max_windows=args.windows, batch_size=1)
    llama = LlamaCppModel(args.gguf, n_ctx=args.ctx, threads=args.threads)
    t0 = time.perf_counter()
    q_stats = summarize(score_windows(base[0], cand[0], windows, spec, desc="quantship", progress=False))
    t1 = time.perf_counter()
    l_stats = summarize(score_windows(base[0], llama, windows, spec, desc="llama.cpp", progress=False))
    t2 = time.perf_counter()
    x_stats = summarize(score_windows(cand[0], llama, windows, spec, desc="cross", progress=False))

    engine = Engine(*load_artifact(args.artifact))
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ours = engine.generate([ids], SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True))[0]
        theirs, their_logits = llama.greedy(ids, args.tokens)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        row = {"prompt": prompt, "match_tokens": first if first is not None else args.tokens,
               "identical": first is None, "quantship": tok.decode(ours), "llama_cpp": tok.decode(theirs)}
        if first is not None:
            prefix = ids + ours[:first]
            with torch.no_grad():
                ref = cand[0](input_ids=torch.tensor([prefix])).logits[0, -1].float()
            row["divergence"] = {
                "position": first, "quantship_token": tok.decode([ours[first]]),
                "llama_cpp_token": tok.decode([theirs[first]]),
                "exact_forward_top2_margin": _margin(ref),
                "exact_forward_logit_gap": float(ref[ours[first]] - ref[theirs[first]]),
                "llama_cpp_top2_margin": _margin(their_logits[first]),
            }
        rows.append(row)
    result = {
        "artifact": args.artifact, "gguf": args.gguf, "model": args.model, "text": name, "ctx": args.ctx,
        "windows": int(len(windows)), "scored": "second half of each window",
        "kld_vs_fp32": {"quantship_artifact": q_stats, "llama_cpp_gguf": l_stats},
        "kld_llama_cpp_vs_quantship_artifact": {k: x_stats[k] for k in ("tokens",) if k in x_stats}
        | {"kld": x_stats.get("kld")},
        "seconds": {"quantship_eval": round(t1 - t0, 1), "llama_cpp_eval": round(t2 - t1, 1)},
        "greedy": rows, "engine_decode_path": engine.decode_path,
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }
    print(json.dumps({"kld_mean": {"quantship": q_stats["kld"]["mean"], "llama_cpp": l_stats["kld"]["mean"],
                                   "llama_cpp_vs_artifact": x_stats["kld"]["mean"]},
                      "greedy_match": [r["match_tokens"] for r in rows],
                      "divergences": [r.get("divergence") for r in rows]}, indent=1))
    if args.json:
        from quantship.fsutil import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
