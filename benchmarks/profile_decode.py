"""Where a decode step's time goes: torch.profiler over batch-1 greedy decoding on the engine.

    .venv/bin/python benchmarks/profile_decode.py out/bench/w8 [--tokens 32] [--rows 15]

Prints the operators sorted by self CPU time and the share of the step spent outside any operator
(Python, sampling, bookkeeping), so a slow path says whether it is kernels or overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from quantship.bench.run import load_engine
from quantship.specs import BenchSpec
from quantship.engine import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="built-in name, HF folder or quantship artifact")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    engine, _, _ = load_engine(BenchSpec(model=args.model, input_len=args.prompt_len, output_len=args.tokens,
                                         max_batch=1, measure_bandwidth=False))
    prompt = list(range(100, 100 + args.prompt_len))
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up: first-call allocations and kernel setup
    engine.add_request(prompt, params)
    engine.step()  # prefill, not profiled
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        wall = time.perf_counter() - started
    events = prof.key_averages()
    in_ops = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"{args.model}: {steps} decode steps, {wall / steps * 1e3:.2f} ms/step wall (profiled), "
          f"{in_ops / steps * 1e3:.2f} ms/step inside torch operators "
          f"({in_ops / wall:.0%}); the rest is Python and scheduling")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
