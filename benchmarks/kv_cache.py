"""KV-cache quantization on a long context: KL divergence of bf16, int8 and fp8 KV vs the float cache.

    .venv/bin/python benchmarks/kv_cache.py [--ctx 1536] [--prefill 256] [--out docs/results]

Teacher-forced: the same real text is fed to two engines that differ only in the KV cache;
after a prefill, every following token is decoded one by one and the next-token distributions
are compared (KL(P_float || P_quantized)), so late positions attend over a long quantized history.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import quantship
from quantship.artifact import environment
from quantship.corpora import corpus_text
from quantship.engine import Engine
from quantship.fsutil import atomic_write_text
from quantship.models.builtin import model_dir


def teacher_forced_logprobs(engine: Engine, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    f = engine.forward
    out = [torch.log_softmax(f.prefill(ids[:prefill], engine.cache, 0), -1)]
    for pos in range(prefill, len(ids) - 1):
        out.append(torch.log_softmax(f.decode(ids[pos : pos + 1], torch.tensor([pos]), engine.cache)[0], -1))
    return torch.stack(out)  # (positions, V)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=1536)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    model, tok = quantship.load(model_dir("smollm2-135m"))
    ids = torch.tensor(tok(corpus_text("news"), add_special_tokens=False)["input_ids"][: args.ctx])
    ref_engine = Engine(model, tok, fast=False, max_batch=1, max_seq_len=args.ctx)
    ref = teacher_forced_logprobs(ref_engine, ids, args.prefill)
    lines = [f"# KV-cache quantization, smollm2-135m, {args.ctx}-token context (teacher-forced decode after "
             f"a {args.prefill}-token prefill)", "", f"Machine: {environment()['cpu']}.", "",
             "| KV cache | bytes/token | vs fp32 | KLD mean | KLD p99 | KLD mean, last 256 positions | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base_bytes = ref_engine.kv_bytes_per_token()
    lines.append(f"| float32 | {base_bytes} | 1.00 | 0 | 0 | 0 | 1.0000 |")
    for kind in ("bfloat16", "int8", "fp8"):
        engine = Engine(model, tok, fast=False, max_batch=1, max_seq_len=args.ctx, kv_cache=kind)
        cand = teacher_forced_logprobs(engine, ids, args.prefill)
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)
        top1 = float((ref.argmax(-1) == cand.argmax(-1)).float().mean())
        p99 = float(torch.quantile(kl, 0.99))
        lines.append(f"| {kind} | {engine.kv_bytes_per_token()} | {engine.kv_bytes_per_token() / base_bytes:.3f} | "
                     f"{float(kl.mean()):.6f} | {p99:.6f} | {float(kl[-256:].mean()):.6f} | {top1:.4f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(f"{args.out}/kv_cache.md", text)


if __name__ == "__main__":
    main()
