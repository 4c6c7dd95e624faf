"""Every storage scheme with RTN on the default model: bpw, size, perplexity, KLD, top-1.

    .venv/bin/python benchmarks/schemes.py [--schemes w8,w4g64,...] [--max-windows 40] [--out docs/results]

Writes schemes.json and schemes.md (a table with the machine facts) under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import quantship
from quantship.artifact import environment
from quantship.fsutil import atomic_write_json, atomic_write_text
from quantship.models.builtin import model_dir, pull

DEFAULT = "w8,w8pt,fp8,w4g32-asym,w4g32,w4g64,w4g64-asym,nf4g64,w4,w3g64,w3g64-asym,w2g64-asym"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default=DEFAULT)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--clip-search", action="store_true")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()

    pull(args.model)
    baseline = quantship.load(model_dir(args.model))
    rows = []
    for scheme in args.schemes.split(","):
        started = time.perf_counter()
        out = Path("out/bench") / f"{args.model}-{scheme}"
        quantship.quantize(args.model, scheme, out=out, overwrite=True, progress=False,
                           method_params={"clip_search": True} if args.clip_search else None)
        q_s = time.perf_counter() - started
        manifest = quantship.verify(out)
        cand = quantship.load(out)
        rep = quantship.evaluate(baseline, cand, max_windows=args.max_windows).to_json()
        rows.append({
            "scheme": scheme, "bpw": manifest["bits_per_weight"]["quantized_layers"],
            "file_bytes": (out / "model.safetensors").stat().st_size, "quantize_s": round(q_s, 1),
            "ppl_base": rep["ppl"]["baseline"], "ppl": rep["ppl"]["candidate"], "kld_mean": rep["kld"]["mean"],
            "kld_p99": rep["kld"]["p99"], "top1": rep["top1_agreement"], "tokens": rep["tokens"],
        })
        print(rows[-1], flush=True)
    base_bytes = (model_dir(args.model) / "model.safetensors").stat().st_size
    env = environment()
    lines = [
        f"# RTN schemes on {args.model}{' (clip search)' if args.clip_search else ''}",
        "",
        f"Eval text: news corpus eval split, ctx 512, second half of each window scored, "
        f"{rows[0]['tokens']} tokens. Machine: {env['cpu']}, {env['cores']} cores; torch {env['torch']}.",
        "The source is a Q4_1 GGUF (4-bit, group 32, scale+min): `w4g32-asym` reproduces its grid exactly.",
        "bpw counts codes + fp16 scales (+ fp16 offsets for -asym) of the quantized layers; the file also holds "
        "the fp32 embedding (tied lm_head) and norms.",
        "",
        "| scheme | bpw | file | ppl | Δppl % | KLD mean | KLD p99 | top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 baseline | 32 | {base_bytes / 2**20:.1f} MiB | {rows[0]['ppl_base']:.3f} | | | | |",
    ]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['bpw']:.2f} | {r['file_bytes'] / 2**20:.1f} MiB | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / r['ppl_base'] - 1):+.2f} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | "
                     f"{r['top1']:.4f} |")
    out_dir = Path(args.out)
    suffix = "-clip" if args.clip_search else ""
    atomic_write_json(out_dir / f"schemes{suffix}.json", {"rows": rows, "environment": env})
    atomic_write_text(out_dir / f"schemes{suffix}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
