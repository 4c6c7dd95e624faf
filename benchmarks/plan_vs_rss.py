"""Does the memory planner predict what the engine really uses? Measured peak RSS vs plan, per batch x ctx.

    .venv/bin/python benchmarks/plan_vs_rss.py [--cases 1x512 4x512 16x512 1x2048 16x2048] [--out docs/results]

Each case runs in a fresh subprocess (peak RSS is a high-water mark of the whole process):
load the default model (fp32) into an Engine with a float32 KV cache of batch x ctx, send
`batch` requests whose prompt + output fill the context, and read the peak RSS (VmHWM). The prediction
is bench.plan's `predicted_peak_bytes` for the same model, scheme, KV type, batch and context
(weights + KV + activations of the step + the runtime's own memory). Target: within 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = "smollm2-135m"
OUTPUT_TOKENS = 16


def child(batch: int, ctx: int, scheme_path: str) -> dict:
    """Runs in the subprocess: runtime RSS after imports, then peak RSS after filling the cache."""
    from quantship.memory import peak_rss_bytes

    import torch  # noqa: F401  (the runtime's own memory is measured after the imports)
    import transformers  # noqa: F401

    from quantship.engine import Engine, SamplingParams
    from quantship.models.load import load_model

    runtime = peak_rss_bytes()
    model, tok = load_model(scheme_path, log=lambda *a, **k: None)
    loaded = peak_rss_bytes()
    engine = Engine(model, tok, max_batch=batch, max_seq_len=ctx, kv_cache="float32")
    built = peak_rss_bytes()
    ids = tok("\n\n".join(__import__("quantship.corpora", fromlist=["x"]).documents("news", "eval")),
              add_special_tokens=False)["input_ids"]
    prompt_len = ctx - OUTPUT_TOKENS
    prompts = [ids[i * 97: i * 97 + prompt_len] for i in range(batch)]  # distinct real-text windows
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True))
    return {"batch": batch, "ctx": ctx, "runtime_rss": runtime, "loaded_rss": loaded, "engine_rss": built, "peak_rss": peak_rss_bytes(),
            "run_s": time.perf_counter() - t0, "prompt_len": prompt_len}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["1x512", "4x512", "16x512", "1x2048", "16x2048"])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--child", nargs=3, metavar=("BATCH", "CTX", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2])))
        return
    from rich.table import Table

    from quantship.artifact import environment
    from quantship.bench.plan import plan, predicted_peak_bytes
    from quantship.fsutil import atomic_write_json
    from quantship.models.load import resolve_model
    from quantship.report import console, fmt_bytes

    path = str(resolve_model(MODEL))
    rows = []
    for case in args.cases:
        batch, ctx = (int(x) for x in case.lower().split("x"))
        out = subprocess.run([sys.executable, __file__, "--child", str(batch), str(ctx), path],
                             capture_output=True, text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        p = plan(path, "fp32", kv="float32", ctx=ctx, memory="24GiB", source="fp32")
        predicted = predicted_peak_bytes(p, batch=batch, prefill_tokens=measured["prompt_len"], engine_head_int8=True)
        rows.append({**measured, "predicted": predicted, "ratio": measured["peak_rss"] / predicted["total"]})
        console.print(f"{case}: measured {fmt_bytes(measured['peak_rss'])}, predicted {fmt_bytes(predicted['total'])}, "
                      f"ratio {rows[-1]['ratio']:.3f} (runtime after imports {fmt_bytes(measured['runtime_rss'])}, "
                      f"after load {fmt_bytes(measured['loaded_rss'])}, engine built {fmt_bytes(measured['engine_rss'])}, run {measured['run_s']:.0f} s)")
    table = Table(title=f"{MODEL} fp32, float32 KV: measured peak RSS vs plan", header_style="bold")
    for col in ("batch x ctx", "weights", "KV", "activations", "runtime", "predicted", "measured", "measured/plan"):
        table.add_column(col, justify="right")
    for r in rows:
        p = r["predicted"]
        table.add_row(f"{r['batch']} x {r['ctx']}", fmt_bytes(p["weights"]), fmt_bytes(p["kv"]),
                      fmt_bytes(p["activations"]), fmt_bytes(p["runtime"]), fmt_bytes(p["total"]),
                      fmt_bytes(r["peak_rss"]), f"{r['ratio']:.3f}")
    console.print(table)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"worst deviation {worst:.1%} (target: within 15%) -> {'PASS' if worst <= 0.15 else 'MISS'}")
    atomic_write_json(f"{args.out}/plan_vs_rss.json", {"model": MODEL, "rows": rows, "worst_deviation": worst,
                                                       "environment": environment(), "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
