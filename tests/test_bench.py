"""Benchmark harness: metrics against hand-computed values, SLO and spec errors, Poisson arrivals,
and run_bench / `quantship bench` end to end on a tiny model (few tokens, so each test is quick)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from quantship.bench.metrics import RequestTiming, load_metrics, meets_slo, parse_slo, percentile, summarize
from quantship.bench.results import BenchReport
from quantship.bench.run import run_bench
from quantship.specs import BenchSpec
from quantship.bench.workload import corpus_prompts, poisson_arrivals, sample_lengths
from quantship.cli import main as cli

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")
SINGLE_KEYS = ("load_s", "prefill_tok_s", "ttft_s", "tpot_s", "decode_tok_s", "peak_rss_bytes", "bandwidth_gbs")


# ----- metrics -------------------------------------------------------------------------------
def test_percentile_by_hand_and_against_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 95) == pytest.approx(3.85)  # position 3 x 0.95 = 2.85 -> 3 + 0.85 x (4 - 3)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    rng = random.Random(1)
    ys = [rng.random() for _ in range(37)]
    for q in (1, 50, 95, 99):
        assert percentile(ys, q) == pytest.approx(float(np.percentile(ys, q)))
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_request_timing_ttft_tpot_itl_e2e_by_hand():
    t = RequestTiming(arrival=10.0, token_times=(10.5, 10.6, 10.8, 11.1), prompt_tokens=7)
    assert t.ttft == pytest.approx(0.5)
    assert t.e2e == pytest.approx(1.1)
    assert t.tpot == pytest.approx(0.6 / 3)  # (E2E - TTFT) / (4 - 1)
    assert t.itls == pytest.approx([0.1, 0.2, 0.3])
    assert RequestTiming(0.0, (0.2,)).tpot is None  # one token: no TPOT
    with pytest.raises(ValueError):
        RequestTiming(1.0, (0.5,))  # a token before its arrival
    with pytest.raises(ValueError):
        RequestTiming(0.0, (0.5, 0.4))


def test_load_metrics_and_goodput_by_hand():
    timings = [
        RequestTiming(0.0, (0.5, 0.6, 0.7), 4),  # ttft .5, tpot .1, e2e .7
        RequestTiming(0.0, (1.0, 1.3, 1.6), 4),  # ttft 1.0, tpot .3, e2e 1.6
        RequestTiming(1.0, (1.2,), 2),  # ttft .2, no tpot, e2e .2
    ]
    m = load_metrics(timings, duration=2.0, slo={"ttft": 0.6, "tpot": 0.2})
    assert m["completed"] == 3 and m["total_output_tokens"] == 7 and m["total_input_tokens"] == 10
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_tok_s"] == pytest.approx(3.5)
    assert m["ttft_s"]["mean"] == pytest.approx((0.5 + 1.0 + 0.2) / 3)
    assert m["ttft_s"]["median"] == pytest.approx(0.5)
    assert m["tpot_s"]["mean"] == pytest.approx(0.2)  # the one-token request has no TPOT
    assert m["itl_s"]["median"] == pytest.approx(0.2)  # gaps of all requests pooled: .1 .1 .3 .3
    assert m["e2e_s"]["p99"] == pytest.approx(percentile([0.7, 1.6, 0.2], 99))
    # request 1 meets both, request 2 misses both, request 3 meets ttft and has no TPOT (passes, as in vllm)
    assert m["goodput"] == pytest.approx(2 / 2.0)
    assert m["slo_attainment"] == pytest.approx(2 / 3)
    assert load_metrics(timings, 2.0)["goodput"] is None
    assert not meets_slo(timings[0], {"e2e": 0.69}) and meets_slo(timings[0], {"e2e": 0.7})


def test_summarize_of_nothing_is_none():
    assert summarize([]) == {"mean": None, "median": None, "p95": None, "p99": None}
    with pytest.raises(ValueError, match="no completed requests"):
        load_metrics([], 1.0)


def test_parse_slo_units_and_errors():
    assert parse_slo("ttft=500ms, tpot=0.05,e2e=10s") == {"ttft": 0.5, "tpot": 0.05, "e2e": 10.0}
    assert parse_slo("e2el=2") == {"e2e": 2.0}  # vllm's spelling
    assert parse_slo("") == {}
    for bad in ("ttft", "latency=1", "ttft=fast", "ttft=-1", "ttft=1h", "ttft=1,ttft=2"):
        with pytest.raises(ValueError, match="ttft|SLO"):
            parse_slo(bad)


# ----- workload ------------------------------------------------------------------------------
def test_poisson_arrivals_deterministic_with_a_seed():
    a = poisson_arrivals(2000, rate=4.0, seed=7)
    assert a == poisson_arrivals(2000, rate=4.0, seed=7)
    assert a != poisson_arrivals(2000, rate=4.0, seed=8)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    mean_gap = a[-1] / (len(a) - 1)
    assert mean_gap == pytest.approx(1 / 4.0, rel=0.1)  # exponential gaps with mean 1/rate
    with pytest.raises(ValueError):
        poisson_arrivals(3, rate=0.0, seed=0)


def test_lengths_and_prompts():
    rng = random.Random(0)
    assert sample_lengths(3, 10, 0.0, rng) == [10, 10, 10]
    lens = sample_lengths(500, 100, 0.5, rng)
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    prompts = corpus_prompts(list(range(1000)), [5, 7], random.Random(0))
    assert [len(p) for p in prompts] == [5, 7]
    assert prompts[0] == list(range(prompts[0][0], prompts[0][0] + 5))  # contiguous windows of the text
    with pytest.raises(ValueError, match="longer than the corpus"):
        corpus_prompts(list(range(10)), [11], random.Random(0))


# ----- spec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": 2, "request_rate": 1.0}, "not both"),
    ({"request_rate": 0.0}, "request rate"),
    ({"output_len": 1}, "output_len"),
    ({"input_len": 0}, "input_len"),
    ({"kv": "fp16"}, "float32, bfloat16, int8"),
    ({"slo": "ttft=soon"}, "SLO"),
    ({"range_ratio": 0.5}, "load modes"),
    ({"concurrency": 2, "range_ratio": 1.0}, "range_ratio"),
    ({"price_per_hour": -1.0}, "price"),
    ({"model": " "}, "model is empty"),
])
def test_bench_spec_rejects_bad_input(kwargs, message):
    args = {"model": "x", **kwargs}
    with pytest.raises(ValueError, match=message):
        BenchSpec(**args)


def test_bench_spec_max_seq_len_covers_the_length_range():
    assert BenchSpec("m", input_len=100, output_len=50).max_seq_len == 150
    assert BenchSpec("m", concurrency=2, input_len=100, output_len=50, range_ratio=0.2).max_seq_len == 180


# ----- end to end on a tiny model --------------------------------------------------------------
def _spec(model, **kw) -> BenchSpec:
    base = dict(model=str(model), input_len=12, output_len=6, repeats=2, measure_bandwidth=False)
    return BenchSpec(**{**base, **kw})


def test_run_bench_single_stream_keys_and_consistency(tiny_models):
    report = run_bench(_spec(tiny_models["llama"], price_per_hour=3.6), progress=False)
    r = report.to_json()
    assert BenchReport.from_json(r) == report and BenchReport.from_json(json.loads(json.dumps(r))).to_json() == r
    for key in SINGLE_KEYS:
        assert key in r
    assert r["mode"] == "single" and r["prompt_tokens"] == 12 and r["output_tokens"] == 6
    assert r["decode_tok_s"] == pytest.approx(1 / r["tpot_s"])
    assert r["prefill_tok_s"] == pytest.approx(12 / r["ttft_s"])
    assert r["load_s"] > 0 and r["peak_rss_bytes"] > 10 * 2**20 and r["bandwidth_gbs"] > 0
    # $3.6/hour = $0.001/s: cost per 1M tokens = 1000 / tok_s
    assert r["cost_per_million_output_tokens"] == pytest.approx(1000 / r["decode_tok_s"])
    assert r["machine"]["cores"] >= 1 and r["versions"]["torch"]
    json.dumps(r)  # JSON-ready


def test_run_bench_concurrency_keys_and_counts(tiny_models):
    report = run_bench(_spec(tiny_models["llama"], concurrency=3, num_prompts=5, slo="ttft=60s,tpot=60s"),
                       progress=False)
    r = report.to_json()
    assert BenchReport.from_json(r) == report and report.load.completed == 5 and report.single is None
    assert r["output_tok_s"] > 0 and r["completed"] == 5 and r["total_output_tokens"] == 5 * 6
    for key in LATENCY_KEYS:
        assert set(r[key]) == {"mean", "median", "p95", "p99"} and r[key]["median"] > 0
    for key in SINGLE_KEYS:
        assert key in r
    assert 1 < r["mean_decode_batch"] <= 3  # requests really ran together, never more than 3 at once
    assert r["goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs: every request is good


def test_run_bench_poisson_with_length_range(tiny_models):
    from transformers import AutoTokenizer

    from quantship.bench.run import make_workload

    spec = _spec(tiny_models["qwen2"], request_rate=200.0, num_prompts=4, range_ratio=0.5)
    prompts, out_lens = make_workload(spec, AutoTokenizer.from_pretrained(tiny_models["qwen2"]))
    assert len({len(p) for p in prompts}) > 1 and all(6 <= len(p) <= 18 for p in prompts)  # drawn, in range
    assert make_workload(spec, AutoTokenizer.from_pretrained(tiny_models["qwen2"])) == (prompts, out_lens)
    r = run_bench(spec, progress=False).to_json()
    assert r["completed"] == 4 and r["mode"] == "request_rate"
    assert r["total_input_tokens"] == sum(map(len, prompts)) and r["total_output_tokens"] == sum(out_lens)


def test_run_bench_rejects_a_request_longer_than_the_context(tiny_models):
    with pytest.raises(ValueError, match="context"):
        run_bench(_spec(tiny_models["llama"], input_len=250, output_len=10), progress=False)


def test_bench_cli_writes_json(tiny_models, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli(["bench", str(tiny_models["llama"]), "--input-len", "10", "--output-len", "4", "--repeats", "1",
                "--concurrency", "2", "--num-prompts", "3", "--no-bandwidth", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TTFT" in text and "output throughput" in text
    data = json.loads(out.read_text())
    assert data["completed"] == 3 and set(data["e2e_s"]) == {"mean", "median", "p95", "p99"}


@pytest.mark.parametrize("args, message", [
    (["--slo", "ttft=later"], "SLO"),
    (["--concurrency", "0"], "concurrency"),
    (["--kv", "fp4"], "KV cache"),
])
def test_bench_cli_bad_input_exits_1_with_a_message(tiny_models, capsys, args, message):
    assert cli(["bench", str(tiny_models["llama"]), "--no-bandwidth", *args]) == 1
    assert message in capsys.readouterr().err


def test_predicted_peak_bytes_adds_the_terms_by_hand():
    from quantship.bench.plan import activation_bytes, plan, predicted_peak_bytes

    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": True}
    p = plan(cfg, "fp32", kv="float32", ctx=100, memory="1GiB", source="fp32")
    out = predicted_peak_bytes(p, batch=3, prefill_tokens=50, engine_head_int8=True, runtime_bytes=1000)
    assert out["kv"] == 3 * 100 * (4 * 2 * 32 * 2 * 4)  # batch x ctx x layers x kv_heads x head_dim x (K,V) x fp32
    assert out["weights"] == p.total_weight_bytes + 1000 * 256 + 1000 * 2  # + int8 head codes and fp16 scales
    assert out["activations"] == activation_bytes(p.shape, prefill_tokens=50, batch=3, act_bytes=4)
    assert out["total"] == out["weights"] + out["kv"] + out["activations"] + 1000
    with pytest.raises(ValueError):
        predicted_peak_bytes(p, batch=0)
