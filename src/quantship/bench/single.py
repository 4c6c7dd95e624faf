"""Single-stream benchmark on an Engine: one request at a time, warm-up excluded, median of repeats.

    TTFT           add_request -> first token (prefill of the whole prompt + first sample)
    prefill tok/s  prompt tokens / TTFT
    TPOT           (last token - first token) / (output tokens - 1)
    decode tok/s   1 / TPOT
    bandwidth      bytes read per decoded token x decode tok/s, where bytes = engine.weight_bytes()
                   + KV bytes per token x the mean context during decode (prompt + output / 2)
"""

from __future__ import annotations

import statistics
import time

from ..memory import peak_rss_bytes


def _one_run(engine, prompt: list[int], output_len: int, params_cls) -> tuple[float, list[float]]:
    params = params_cls(max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    rid = engine.add_request(list(prompt), params)
    times: list[float] = []
    while engine.has_unfinished():
        times.extend(ev.time for ev in engine.step() if ev.request_id == rid)
    return t0, times


def single_stream(engine, prompt: list[int], *, output_len: int = 128, repeats: int = 3, warmup: int = 1,
                  load_s: float | None = None, bandwidth_gbs: float | None = None, params_cls=None,
                  on_run=None) -> dict:
    """Time `repeats` greedy generations of `output_len` tokens from `prompt` (token ids).
    `on_run()` is called after each run, warm-up included (progress bars)."""
    if output_len < 2:
        raise ValueError(f"output_len must be >= 2 to time decoding, got {output_len}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if params_cls is None:
        from ..engine import SamplingParams as params_cls
    for _ in range(warmup):
        _one_run(engine, prompt, output_len, params_cls)
        if on_run:
            on_run()
    ttfts, tpots = [], []
    for _ in range(repeats):
        t0, times = _one_run(engine, prompt, output_len, params_cls)
        if len(times) != output_len:
            raise RuntimeError(f"the engine produced {len(times)} tokens, expected {output_len} (ignore_eos was set)")
        ttfts.append(times[0] - t0)
        tpots.append((times[-1] - times[0]) / (len(times) - 1))
        if on_run:
            on_run()
    ttft, tpot = statistics.median(ttfts), statistics.median(tpots)
    context = len(prompt) + output_len / 2
    bytes_per_token = engine.weight_bytes() + engine.kv_bytes_per_token() * context
    achieved = bytes_per_token / tpot / 1e9
    return {
        "mode": "single",
        "prompt_tokens": len(prompt),
        "output_tokens": output_len,
        "repeats": repeats,
        "warmup": warmup,
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tok_s": len(prompt) / ttft,
        "tpot_s": tpot,
        "decode_tok_s": 1.0 / tpot,
        "ttft_runs_s": ttfts,
        "tpot_runs_s": tpots,
        "weight_bytes": engine.weight_bytes(),
        "kv_bytes_per_token": engine.kv_bytes_per_token(),
        "bytes_per_decoded_token": bytes_per_token,
        "bandwidth_gbs": achieved,
        "measured_bandwidth_gbs": bandwidth_gbs,
        "bandwidth_fraction": achieved / bandwidth_gbs if bandwidth_gbs else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
