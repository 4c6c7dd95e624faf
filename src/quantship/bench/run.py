"""`quantship bench`: load a model or artifact into the Engine and measure it.

    single stream (default)   bench.single: TTFT, prefill tok/s, TPOT, decode tok/s, bandwidth
    --concurrency N           closed loop, N requests in flight        } bench.load + bench.metrics:
    --request-rate R          open loop, Poisson arrivals (seeded)     } TTFT/TPOT/ITL/E2E, goodput

Both report the cold load time, peak RSS, machine facts with the machine's measured read
bandwidth, and (with --price-per-hour) cost per million output tokens.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

from ..specs import BenchSpec
from .metrics import load_metrics
from .results import BenchModel, BenchReport, LoadStats, SingleStreamStats

def run_bench(spec: BenchSpec, *, progress: bool = True) -> BenchReport:
    """Measure `spec.model` on the engine; -> BenchReport (its to_json(): the keys in docs/bench.md)."""
    from .machine import machine_info
    from .plan import cost_per_million_tokens

    machine = machine_info(measure=False).to_dict()
    if spec.measure_bandwidth:  # before loading, so the model's threads do not compete with it
        machine["bandwidth_gbs"] = measure_bandwidth_subprocess()
    machine = json.loads(json.dumps(machine))  # plain JSON values (tuples as lists): exact round trips
    engine, load_s, model_info = load_engine(spec)
    if spec.mode == "single":
        result = _single(engine, spec, load_s, machine["bandwidth_gbs"], progress)
        stats = {"single": SingleStreamStats.from_json({k: result.pop(k) for k in _names(SingleStreamStats)})}
    else:
        result = _load(engine, spec, load_s, machine["bandwidth_gbs"], progress)
        stats = {"load": LoadStats.from_json({k: result.pop(k) for k in _names(LoadStats)})}
    throughput = stats["single"].decode_tok_s if spec.mode == "single" else stats["load"].output_tok_s
    cost = cost_per_million_tokens(throughput, spec.price_per_hour) if spec.price_per_hour is not None else None
    return BenchReport(**result, cost_per_million_output_tokens=cost, spec=spec, model=BenchModel(**model_info),
                       machine=machine, versions=_versions(), kernels=dict(engine.kernels), fused_groups=engine.fused,
                       decode_path=engine.decode_path,
                       decode_note=engine.decode_note, **stats)


def _names(cls) -> list[str]:
    from dataclasses import fields

    return [f.name for f in fields(cls)]


def load_engine(spec: BenchSpec):
    """-> (Engine, cold load seconds, model facts). Load time = reading + verifying + kernel preparation."""
    from ..engine import Engine
    from ..models.load import is_artifact, load_model, read_config, resolve_model

    path = resolve_model(spec.model, log=lambda *a, **k: None)
    limit = read_config(path).get("max_position_embeddings") or 2048
    if spec.max_seq_len > limit:
        raise ValueError(f"prompt + output need up to {spec.max_seq_len} tokens but the model's context is {limit}; "
                         f"lower --input-len / --output-len")
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, log=lambda *a, **k: None)
    engine = Engine(model, tokenizer, max_batch=max(spec.max_batch, spec.concurrency or 1),
                    max_seq_len=spec.max_seq_len, kv_cache=spec.kv)
    load_s = time.perf_counter() - t0
    from ..models.digest import folder_sha256

    sha256, digest = folder_sha256(path)
    info = {"path": str(path), "artifact": is_artifact(path), "scheme": None, "sha256": sha256, "digest": digest}
    if info["artifact"]:
        from ..artifact import read_manifest

        info["scheme"] = read_manifest(path).get("scheme")
    return engine, load_s, info


def make_workload(spec: BenchSpec, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) for the load modes, deterministic in spec.seed."""
    from .workload import corpus_prompts, corpus_token_ids, sample_lengths

    rng = random.Random(spec.seed)
    in_lens = sample_lengths(spec.num_prompts, spec.input_len, spec.range_ratio, rng)
    out_lens = sample_lengths(spec.num_prompts, spec.output_len, spec.range_ratio, rng)
    out_lens = [max(2, n) for n in out_lens]  # TPOT needs two tokens
    ids = corpus_token_ids(tokenizer, spec.corpus, min_tokens=max(8192, 4 * max(in_lens)))
    return corpus_prompts(ids, in_lens, rng), out_lens


def _single(engine, spec: BenchSpec, load_s: float, bandwidth: float | None, progress: bool) -> dict:
    from .single import single_stream
    from .workload import corpus_prompts, corpus_token_ids

    ids = corpus_token_ids(engine.tokenizer, spec.corpus, min_tokens=max(8192, 4 * spec.input_len))
    prompt = corpus_prompts(ids, [spec.input_len], random.Random(spec.seed))[0]
    with _progress(progress, "single stream", spec.warmup + spec.repeats) as advance:
        return single_stream(engine, prompt, output_len=spec.output_len, repeats=spec.repeats, warmup=spec.warmup,
                             load_s=load_s, bandwidth_gbs=bandwidth, on_run=advance)


def _load(engine, spec: BenchSpec, load_s: float, bandwidth: float | None, progress: bool) -> dict:
    from ..engine import SamplingParams
    from .load import run_load
    from ..memory import peak_rss_bytes
    from .workload import poisson_arrivals

    prompts, out_lens = make_workload(spec, engine.tokenizer)
    if spec.warmup:  # first calls pay one-time costs (allocations, kernel dispatch caches): not timed
        engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, ignore_eos=True))
    kwargs = {"concurrency": spec.concurrency} if spec.mode == "concurrency" else {
        "arrivals": [0.0] * spec.num_prompts if math.isinf(spec.request_rate)
        else poisson_arrivals(spec.num_prompts, spec.request_rate, spec.seed)}
    with _progress(progress, f"{spec.mode} load", spec.num_prompts) as advance:
        timings, duration, steps = run_load(engine, prompts, out_lens, on_finish=advance, **kwargs)
    out = load_metrics(timings, duration, spec.slos or None)
    # Per decode step the weights are read once for the whole batch: achieved weight bandwidth
    # is weight bytes x steps/s (+ the KV read, at the mean context of the run).
    mean_ctx = sum(len(p) for p in prompts) / len(prompts) + sum(out_lens) / len(out_lens) / 2
    step_s = steps.decode_s / steps.decode_steps if steps.decode_steps else None
    mean_batch = steps.decode_tokens / steps.decode_steps if steps.decode_steps else 0.0
    bytes_per_step = engine.weight_bytes() + engine.kv_bytes_per_token() * mean_ctx * mean_batch
    achieved = bytes_per_step / step_s / 1e9 if step_s else None
    out.update(
        mode=spec.mode, concurrency=spec.concurrency, request_rate=spec.request_rate, load_s=load_s,
        prefill_tok_s=steps.prefill_tokens / steps.prefill_s if steps.prefill_s else None,
        decode_tok_s=steps.decode_tokens / steps.decode_s if steps.decode_s else None,  # inside decode steps only
        decode_steps=steps.decode_steps, mean_decode_batch=mean_batch,
        weight_bytes=engine.weight_bytes(), kv_bytes_per_token=engine.kv_bytes_per_token(),
        bandwidth_gbs=achieved, measured_bandwidth_gbs=bandwidth,
        bandwidth_fraction=achieved / bandwidth if achieved and bandwidth else None,
        peak_rss_bytes=peak_rss_bytes())
    return out


class _progress:
    """A rich progress bar (on stderr) for a step of `total` units; a no-op when disabled."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


def measure_bandwidth_subprocess(size_bytes: int = 1 << 30, timeout: float = 120) -> float | None:
    """The machine's read bandwidth (GB/s) measured in a child process, so its 1 GiB buffer never counts
    towards this process's peak RSS. None (with a warning) if the child fails."""
    code = ("from quantship.bench.machine import measure_bandwidth as m; "
            f"print(m({int(size_bytes)}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        print(f"warning: bandwidth measurement failed ({e}); bandwidth fraction not reported", file=sys.stderr)
        return None


def _versions() -> dict:
    from ..artifact import environment

    env = environment()
    return {k: env[k] for k in ("python", "torch", "transformers", "quantship", "git_commit", "platform")}
