"""Batch-1 and small-batch GEMV of QuantLinear paths side by side, cold caches.

    .venv/bin/python benchmarks/kernels.py [--layers 60] [--repeats 7] [--out docs/results] [--part all|gemv|w8a8]

Cycles through `--layers` distinct 1536x576 layers (SmolLM2's MLP shape; 60 fp32 copies =
212 MB, far beyond the caches) so every call reads its weights from memory, as in decode.
Reports the median over repeats of the mean time per layer, effective weight bandwidth, and
the speed-up over fp32 F.linear.

`--part w8a8` measures the int8 x int8 path of `w8a8` (per-token int8 activations, torch._int_mm)
against fp32 F.linear and the int8 weight-only kernel on the default model's three layer shapes
(out x in = 1536x576, 576x1536, 576x576) at M = 1, 16, 512 rows, each shape with enough distinct
layers cycled (>= 96 MB of fp32 weights) that weights come from memory. Each part rewrites only
its own section of kernels.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quantship import native
from quantship.artifact import environment
from quantship.formats import kernels as qk
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


# torch's weight-only kernels (bf16 activations), measured beside the kernel prepare_fast() picks
TORCH_KERNELS = {"w8": (qk._prepare_int8, qk._int8_weight_only, "_weight_int8pack_mm"),
                 "w4": (qk._prepare_int4, qk._int4_group, "_weight_int4pack_mm_for_cpu")}


W8A8_SECTION = "\n## w8a8: int8 x int8 (torch._int_mm) vs fp32 and int8 weight-only"


def w8a8_section(args) -> str:
    torch.manual_seed(0)
    env = environment()
    lines = [W8A8_SECTION.strip(), "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}; median of {args.repeats} repeats of "
             "the mean time per layer over distinct layers cycled (>= 96 MB fp32 weights per shape). w8a8 includes "
             "quantizing the activations per token and the fp32 rescale + bias; int8 weight-only runs bf16 activations. "
             f"torch threads: {torch.get_num_threads()}. `w8a8 int8 x int8` forces torch._int_mm at every M; "
             "`w8a8 reference` = dequantize + fake-quant + fp32 matmul (what prepare_fast keeps for M > 2).",
             "", "| layer (out x in) | M | fp32 F.linear us | int8 weight-only us | w8a8 int8 x int8 us | "
             "w8a8 reference us | int8 x int8 vs fp32 | int8 x int8 vs int8 weight-only |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for n, k in ((1536, 576), (576, 1536), (576, 576)):
            count = max(8, (96 << 20) // (n * k * 4))
            weights = [torch.randn(n, k) * 0.02 for _ in range(count)]
            bias = torch.randn(n) * 0.01
            w8 = [QuantLinear.from_quantized(quantize_weight(parse_scheme("w8"), w), bias) for w in weights]
            a8 = [QuantLinear.from_quantized(quantize_weight(parse_scheme("w8a8"), w), bias) for w in weights]
            assert {l.prepare_fast() for l in w8} <= {"int8_native", "int8_weight_only"}
            assert {l.prepare_fast() for l in a8} == {"w8a8_int8_int_mm"}
            for l in a8:
                l.kernel_state["max_rows"] = 1 << 30  # measure the int8 path at every M
            ref = a8[: max(4, count // 4)]
            for m in (1, 16, 512):
                x = torch.randn(m, k)
                reps = args.repeats if m < 512 else max(3, args.repeats // 2)
                t32 = time_per_call([lambda w=w: F.linear(x, w, bias) for w in weights], reps)
                t8 = time_per_call([lambda l=l: l(x) for l in w8], reps)
                ta8 = time_per_call([lambda l=l: l(x) for l in (a8 if m < 16 else a8[:4])], reps if m < 16 else 3)
                tref = time_per_call([lambda l=l: l.reference_forward(x) for l in ref], 3)
                lines.append(f"| {n}x{k} | {m} | {t32 * 1e6:.1f} | {t8 * 1e6:.1f} | {ta8 * 1e6:.1f} | "
                             f"{tref * 1e6:.1f} | {t32 / ta8:.2f}x | {t8 / ta8:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--part", choices=("all", "gemv", "w8a8"), default="all")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.out) / "kernels.md"
    old = path.read_text() if path.is_file() else ""
    old_gemv, _, old_w8a8 = old.partition(W8A8_SECTION)
    gemv = gemv_section(args) if args.part in ("all", "gemv") else old_gemv.rstrip("\n") + "\n"
    w8a8 = w8a8_section(args) if args.part in ("all", "w8a8") else (W8A8_SECTION + old_w8a8).strip("\n") + "\n"
    text = gemv + "\n" + w8a8 if w8a8.strip() else gemv
    print(text)
    atomic_write_text(str(path), text)


def gemv_section(args) -> str:
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
            if native.available() and m <= 16:
                rows.append(("fp32 native GEMV (engine decode)", m, time_per_call(
                    [lambda w=w: torch.ops.quantship.fp32_linear(x, w, None) for w in weights], args.repeats), n * k * 4))
            for scheme in ("w8", "w4g32", "w4g64"):
                layers = [QuantLinear.from_quantized(quantize_weight(parse_scheme(scheme), w), None) for w in weights]
                bytes_ = layers[0].storage_bytes()
                rows.append((f"{scheme} reference (dequantize + fp32 matmul)", m,
                             time_per_call([lambda l=l: l(x) for l in layers], max(1, args.repeats // 3)), bytes_))
                torch_kernel = TORCH_KERNELS[scheme[:2]]  # torch's own kernel beside ours, same layers
                for layer in layers:
                    torch_kernel[0](layer)
                rows.append((f"{scheme} torch {torch_kernel[2]}", m,
                             time_per_call([lambda l=l: torch_kernel[1](l, x) for l in layers], args.repeats), bytes_))
                for layer in layers:
                    layer.kernel_state.clear()
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
