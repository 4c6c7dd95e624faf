"""Quantization methods side by side on the default model: RTN, GPTQ, AWQ, AWQ+GPTQ, HQQ at
w4 (per-channel), w4g64 and w3g64 -- perplexity, KLD, top-1, quantization time and peak RSS.

    .venv/bin/python benchmarks/methods.py [--schemes w4,w4g64,w3g64] [--methods rtn,gptq,...]
        [--calib-samples 128] [--calib-seqlen 512] [--max-windows 40] [--out docs/results] [--resume]
    w8a8 rows: --schemes w8a8 --methods rtn,smoothquant,smoothquant:override=down_proj=w8

Each quantization runs in its own process (so its peak RSS is its own); evaluation runs here
against one loaded baseline. Rows are saved after each run (methods.json); --resume skips rows
already there. Prints the table and the GPTQ gap-closed ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import quantship
from quantship.artifact import environment
from quantship.fsutil import atomic_write_json, atomic_write_text
from quantship.models.builtin import model_dir, pull

QUANTIZE = """
import json, sys, time
import quantship
from quantship.memory import peak_rss_bytes
model, scheme, method, params, overrides, out, n, seqlen = sys.argv[1:9]
t = time.perf_counter()
quantship.quantize(model, scheme, method=method, method_params=json.loads(params), overrides=json.loads(overrides),
                   out=out, overwrite=True, progress=False, calib_samples=int(n), calib_seqlen=int(seqlen),
                   log=lambda *a, **k: None, reclaim_memory=True)  # a one-shot process, as the CLI's quantize
print(json.dumps({"wall_s": time.perf_counter() - t,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def parse_method(spec: str) -> tuple[str, dict, list[str]]:
    """'smoothquant:override=down_proj=w8;alpha=0.5' -> ('smoothquant', {'alpha': 0.5}, ['down_proj=w8']);
    values JSON where they parse; `override=REGEX=SCHEME` entries (repeatable) are per-layer schemes."""
    name, _, rest = spec.partition(":")
    params, overrides = {}, []
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        if key == "override":
            overrides.append(value)
            continue
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params, overrides


def quantize_in_subprocess(model: str, scheme: str, method: str, out: Path, samples: int, seqlen: int) -> dict:
    name, params, overrides = parse_method(method)
    proc = subprocess.run([sys.executable, "-c", QUANTIZE, model, scheme, name, json.dumps(params),
                           json.dumps(overrides), str(out), str(samples), str(seqlen)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{method} {scheme} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gap_closed(rows: list[dict], scheme: str, method: str) -> float | None:
    by = {r["method"]: r for r in rows if r["scheme"] == scheme}  # w8a8's rtn row is the naive one
    if "rtn" not in by or method not in by:
        return None
    base, rtn, m = by["rtn"]["ppl_base"], by["rtn"]["ppl"], by[method]["ppl"]
    return (rtn - m) / (rtn - base) if rtn != base else None


def render(rows: list[dict], args, env: dict) -> str:
    lines = [
        f"# Quantization methods on {args.model}",
        "",
        f"Calibration: default mixture (news 0.7, code 0.3; calibration splits, disjoint from the eval text), "
        f"{args.calib_samples} x {args.calib_seqlen} tokens, seed 0. Eval: news eval split, ctx 512, "
        f"{rows[0]['tokens'] if rows else '?'} scored tokens. Machine: {env['cpu']}, {env['cores']} cores, "
        f"torch {env['torch']}; load average at start {args.load_at_start}. Times are wall-clock on a shared "
        f"machine (other jobs were running when the load average is above 2).",
        "",
        "| scheme | method | ppl | gap closed vs RTN | KLD mean | top-1 | quantize s | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = gap_closed(rows, r["scheme"], r["method"]) if r["method"] != "rtn" else None
        lines.append(f"| {r['scheme']} | {r['method']} | {r['ppl']:.3f} | {'' if g is None else f'{100 * g:.0f}%'} | "
                     f"{r['kld_mean']:.4f} | {r['top1']:.4f} | {r['quantize_s']:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    if rows:
        lines += ["", f"fp32 baseline ppl {rows[0]['ppl_base']:.3f}; float32 model file "
                      f"{args.model_bytes / 2**20:.0f} MiB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="w4,w4g64,w3g64")
    ap.add_argument("--methods", default="rtn,gptq,awq,awq+gptq,hqq",
                    help="comma-separated; parameters after a colon: 'smoothquant:override=down_proj=w8;alpha=0.5', "
                         "'awq:quantizer=gptq;gptq.percdamp=0.05'")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    args.load_at_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    pull(args.model)
    args.model_bytes = (model_dir(args.model) / "model.safetensors").stat().st_size
    json_path = Path(args.out) / "methods.json"
    rows: list[dict] = []
    if args.resume and json_path.exists():
        rows = json.loads(json_path.read_text())["rows"]
    done = {(r["scheme"], r["method"]) for r in rows}
    baseline = quantship.load(model_dir(args.model))
    env = environment()
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            if (scheme, method) in done:
                continue
            out = Path("out/bench-methods") / f"{scheme}-{''.join(c if c.isalnum() else '-' for c in method)}"
            started = time.perf_counter()
            q = quantize_in_subprocess(args.model, scheme, method, out, args.calib_samples, args.calib_seqlen)
            manifest = quantship.verify(out)
            rep = quantship.evaluate(baseline, quantship.load(out), max_windows=args.max_windows, progress=False).to_json()
            layerwise = (manifest.get("method_report") or {}).get("layerwise") or {}
            rows.append({
                "scheme": scheme, "method": method, "ppl_base": rep["ppl"]["baseline"], "ppl": rep["ppl"]["candidate"],
                "kld_mean": rep["kld"]["mean"], "top1": rep["top1_agreement"], "tokens": rep["tokens"],
                "quantize_s": manifest["timings"].get("quantize_s", q["wall_s"]), "process_wall_s": q["wall_s"],
                "peak_rss_bytes": q["peak_rss_bytes"], "layerwise_s": layerwise.get("seconds"),
                "bpw": manifest["bits_per_weight"]["quantized_layers"],
                "loadavg": os.getloadavg()[0], "bench_wall_s": time.perf_counter() - started,
            })
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
            atomic_write_json(json_path, {"rows": rows, "environment": env, "calib_samples": args.calib_samples,
                                          "calib_seqlen": args.calib_seqlen})
    table = render(rows, args, env)
    atomic_write_text(Path(args.out) / "methods.md", table)
    print(table)
    for scheme, method, target in (("w4", "gptq", 0.65), ("w3g64", "gptq", 0.80)):
        g = gap_closed(rows, scheme, method)
        if g is not None:
            print(f"GPTQ gap closed at {scheme}: {100 * g:.1f}% (target {100 * target:.0f}%): "
                  f"{'met' if g >= target else 'MISSED'}")


if __name__ == "__main__":
    main()
