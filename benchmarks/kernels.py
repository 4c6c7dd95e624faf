"""Batch-1 and small-batch GEMV of QuantLinear paths side by side, cold caches.

    .venv/bin/python benchmarks/kernels.py [--layers 60] [--repeats 7] [--out docs/results]

Cycles through `--layers` distinct 1536x576 layers (SmolLM2's MLP shape; 60 fp32 copies =
212 MB, far beyond the caches) so every call reads its weights from memory, as in decode.
Reports the median over repeats of the mean time per layer, effective weight bandwidth, and
the speed-up over fp32 F.linear.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from quantship.artifact import environment
from quantship.formats.grid import quantize_weight
from quantship.formats.linear import QuantLinear
from quantship.formats.scheme import parse_scheme
from quantship.fsutil import atomic_write_text


def time_per_call(fns, repeats: int) -> float:
    for f in fns:  # warm-up, excluded
        f()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for f in fns:
            f()
        samples.append((time.perf_counter() - started) / len(fns))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, k = 1536, 576
    weights = [torch.randn(n, k) * 0.02 for _ in range(args.layers)]
    rows = []
    with torch.inference_mode():
        for m in args.batch:
            x = torch.randn(m, k)
            base = time_per_call([lambda w=w: F.linear(x, w) for w in weights], args.repeats)
            rows.append(("fp32 F.linear", m, base, n * k * 4))
            wb = [w.bfloat16() for w in weights]
            xb = x.bfloat16()
            rows.append(("bf16 F.linear", m, time_per_call([lambda w=w: F.linear(xb, w) for w in wb], args.repeats),
                         n * k * 2))
            for scheme in ("w8", "w4g32", "w4g64"):
                layers = [QuantLinear.from_quantized(quantize_weight(parse_scheme(scheme), w), None) for w in weights]
                bytes_ = layers[0].storage_bytes()
                rows.append((f"{scheme} reference (dequantize + fp32 matmul)", m,
                             time_per_call([lambda l=l: l(x) for l in layers], max(1, args.repeats // 3)), bytes_))
                kernel = [l.prepare_fast(release_codes=True) for l in layers][0]
                rows.append((f"{scheme} {kernel}", m, time_per_call([lambda l=l: l(x) for l in layers], args.repeats),
                             bytes_))
    env = environment()
    lines = [f"# QuantLinear kernels, 1536x576 layer, cold caches ({args.layers} layers cycled)", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}; median of {args.repeats} repeats.", "",
             "| path | batch | us / layer | weight GB/s | vs fp32 |", "|---|---:|---:|---:|---:|"]
    base_by_m = {m: t for name, m, t, _ in rows if name == "fp32 F.linear"}
    for name, m, t, nbytes in rows:
        lines.append(f"| {name} | {m} | {t * 1e6:.1f} | {nbytes / t / 1e9:.1f} | {base_by_m[m] / t:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(f"{args.out}/kernels.md", text)


if __name__ == "__main__":
    main()
