"""How fast GPTQ could be on this machine: the arithmetic floor of the layer-by-layer pass beside
the measured pass.

    .venv/bin/python benchmarks/gptq_floor.py [--samples 128] [--seqlen 512] [--repeats 5]
        [--manifest out/<artifact>/quantship.json] [--target-s 180] [--out docs/results]

The pass must, per decoder block and over all calibration tokens: run every linear once (the
quantized block produces the next block's inputs), run attention, and accumulate one input Hessian
X^T X per group of linears that share an input. This script counts those FLOPs from the model's
config (each Hessian counted as a symmetric rank-k update, half a GEMM; attention counted causal,
half the score matrix), measures the machine's sustained fp32 rate on the pass's own GEMM shapes
(median of repeats, warm-up excluded, torch's thread count), and prints the floor time: the pass
with every GEMM at that rate and nothing else (no GPTQ solve, no norms, no Python).

With --manifest (a GPTQ artifact's quantship.json) it puts the measured pass beside the floor:
its total, its per-block phases, and the ratio measured / floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantship.artifact import environment
from quantship.fsutil import atomic_write_json
from quantship.models.builtin import DEFAULT_MODEL, model_dir, pull


def block_flops(config: dict, tokens: int, seqlen: int) -> dict[str, float]:
    """FLOPs per decoder block of one GPTQ pass over `tokens` calibration tokens (llama-style block)."""
    d = config["hidden_size"]
    f = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or d // heads
    attn = heads * head_dim
    return {
        "q/k/v linears": 2.0 * tokens * d * (attn + 2 * kv_heads * head_dim),
        "attention (causal)": 2.0 * 2 * tokens * seqlen * attn / 2,
        "o_proj linear": 2.0 * tokens * attn * d,
        "gate/up linears": 2.0 * tokens * d * 2 * f,
        "down_proj linear": 2.0 * tokens * f * d,
        # X^T X is symmetric: a rank-k update needs half the products of a GEMM
        "Hessians q/k/v, o, gate/up": tokens * (2.0 * d * d + float(attn) * attn),
        "Hessian down_proj": tokens * float(f) * f,
    }


def gemm_rates(config: dict, rows: int, repeats: int) -> dict[str, float]:
    """Sustained fp32 GFLOPS on the pass's shapes: a calibration batch through a linear, and its Gram matrix."""
    d, f = config["hidden_size"], config["intermediate_size"]
    torch.manual_seed(0)
    x_d, x_f = torch.randn(rows, d), torch.randn(rows, f)
    w_up, w_down = torch.randn(2 * f, d), torch.randn(d, f)
    cases = {
        f"linear {rows}x{d} -> {2 * f}": (lambda: torch.nn.functional.linear(x_d, w_up), 2.0 * rows * d * 2 * f),
        f"linear {rows}x{f} -> {d}": (lambda: torch.nn.functional.linear(x_f, w_down), 2.0 * rows * f * d),
        f"Gram {f}x{f} over {rows} rows (full GEMM)": (lambda: x_f.t() @ x_f, 2.0 * rows * f * f),
    }
    rates = {}
    for name, (call, flop) in cases.items():
        call()  # warm-up, excluded
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        rates[name] = flop / statistics.median(samples) / 1e9
    return rates


def measured_pass(manifest_path: Path) -> dict:
    """The per-block phases of a layer-by-layer artifact; ValueError naming what is missing."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the manifest {manifest_path}: {e}") from None
    layerwise = (manifest.get("method_report") or {}).get("layerwise")
    if not layerwise or not layerwise.get("blocks"):
        raise ValueError(f"{manifest_path} has no layer-by-layer report (method "
                         f"{(manifest.get('method') or {}).get('name')!r}): pass a GPTQ artifact's quantship.json")
    blocks = layerwise["blocks"]

    def median_of(key):
        values = [b[key] for b in blocks if key in b]
        return statistics.median(values) if values else None

    sequential = median_of("sequential_stats_s") or 0.0
    return {"method": manifest["method"]["name"], "scheme": manifest["scheme"],
            "pass_s": layerwise["seconds"], "blocks": len(blocks),
            "per_block_s": {"statistics (forward parts + Hessians)": sequential + (median_of("stats_s") or 0.0),
                            "GPTQ solve": (median_of("solve_s") or 0.0) - sequential,
                            "finishing the block (tails, re-runs)": median_of("forward_s") or 0.0,
                            "whole block": median_of("seconds")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-windows", type=int, default=2, help="windows per calibration batch (GPTQ's batch_size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--manifest", type=Path, help="a GPTQ artifact's quantship.json to compare with")
    parser.add_argument("--target-s", type=float, default=180.0, help="the time target for the whole pass")
    parser.add_argument("--out", type=Path, help="folder for gptq_floor.json")
    args = parser.parse_args()

    measured = None
    if args.manifest:  # checked before the minutes of measuring
        try:
            measured = measured_pass(args.manifest)
        except ValueError as e:
            parser.error(str(e))
    pull(args.model)
    config = json.loads((model_dir(args.model) / "config.json").read_text())
    config = config.get("text_config", config)
    layers = config["num_hidden_layers"]
    tokens = args.samples * args.seqlen
    flops = block_flops(config, tokens, args.seqlen)
    rates = gemm_rates(config, args.batch_windows * args.seqlen, args.repeats)
    best = max(rates.values())
    per_block = sum(flops.values())
    floor_s = per_block * layers / best / 1e9
    env = environment()

    console = Console()
    console.print(f"{args.model}: {layers} blocks, {tokens} calibration tokens ({args.samples} x {args.seqlen}); "
                  f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, {torch.get_num_threads()} threads")
    rate_table = Table(title="sustained fp32 rate on the pass's shapes (median)")
    rate_table.add_column("GEMM")
    rate_table.add_column("GFLOPS", justify="right")
    for name, rate in rates.items():
        rate_table.add_row(name, f"{rate:.1f}")
    console.print(rate_table)
    work = Table(title=f"work per block, and the whole pass at {best:.1f} GFLOPS")
    for column in ("part", "GFLOP / block", "floor s (all blocks)"):
        work.add_column(column, justify="left" if column == "part" else "right")
    for name, flop in flops.items():
        work.add_row(name, f"{flop / 1e9:.1f}", f"{flop * layers / best / 1e9:.1f}")
    work.add_row("total", f"{per_block / 1e9:.1f}", f"{floor_s:.1f}", style="bold")
    console.print(work)
    console.print(f"floor {floor_s:.0f} s vs target {args.target_s:.0f} s: the target is "
                  f"{'above' if floor_s <= args.target_s else 'BELOW'} the arithmetic floor "
                  f"(floor / target = {floor_s / args.target_s:.2f})")

    result = {"model": args.model, "environment": env, "threads": torch.get_num_threads(), "tokens": tokens,
              "blocks": layers, "gflop_per_block": {k: round(v / 1e9, 2) for k, v in flops.items()},
              "gflops": {k: round(v, 2) for k, v in rates.items()}, "floor_s": round(floor_s, 1),
              "target_s": args.target_s}
    if measured:
        side = Table(title=f"measured pass ({measured['method']} {measured['scheme']}) beside the floor")
        for column in ("", "seconds"):
            side.add_column(column, justify="left" if not column else "right")
        for name, seconds in measured["per_block_s"].items():
            side.add_row(f"per block (median): {name}", f"{seconds:.2f}")
        side.add_row("floor per block", f"{floor_s / layers:.2f}")
        side.add_row("whole pass, measured", f"{measured['pass_s']:.0f}", style="bold")
        side.add_row("whole pass, floor", f"{floor_s:.0f}")
        console.print(side)
        console.print(f"measured / floor = {measured['pass_s'] / floor_s:.2f}; "
                      f"measured / target = {measured['pass_s'] / args.target_s:.2f}")
        result["measured"] = measured
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "gptq_floor.json", result)


if __name__ == "__main__":
    main()
