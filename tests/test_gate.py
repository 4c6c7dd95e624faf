"""Error budgets (parsing and every bad-budget path), gate verdicts on synthetic results (a CI that
straddles the limit included), the gate's reuse checks, the CLI's exit codes."""

from __future__ import annotations

import json

import pytest
import yaml

from quantship.cli import main as cli
from quantship.evaluate.results import (DeltaPStats, ECEStats, EvalReport, EvalSettings, KLDStats, ModelRef,
                                        PplStats, SuiteResult, TaskResults, TokenScores)
from quantship.gate.budget import DEFAULT_TEMPLATE, TOP_KEYS, BudgetError, load_budget, parse_budget
from quantship.gate.decide import Evidence, decide


# ----- synthetic results ----------------------------------------------------------------------------
def scores(kld=0.005, stderr=0.0005, p99=0.05, ppl_b=10.0, ppl_c=10.1, top1=0.97, ece_b=0.02, ece_c=0.025):
    import math

    return TokenScores(tokens=1000, ppl=PplStats(ppl_b, ppl_c, math.log(ppl_c / ppl_b), 0.001),
                       kld=KLDStats(kld, stderr, kld / 2, kld * 3, p99, p99 * 2, p99 * 5), top1_agreement=top1,
                       ece=ECEStats(ece_b, ece_c), delta_p=DeltaPStats(0, 0.01, -0.02, -0.01, 0, 0.01, 0.02))


def suite(delta, ci, significant=False, p=0.5):
    return SuiteResult(baseline=0.5, candidate=0.5 + delta, delta=delta, ci95=ci, p_value=p, significant=significant,
                       flips={"pass_to_fail": 3, "fail_to_pass": 1}, n=100, content_hash="c" * 64)


def report(texts=None, tasks=None, **kw):
    overall = scores(**kw)
    return EvalReport(overall=overall, texts=texts or {"news": overall},
                      settings=EvalSettings(ctx=512, max_windows=40, batch_size=4, texts=tuple(texts or ("news",))),
                      baseline=ModelRef("base", "a" * 64, "files"), candidate=ModelRef("cand", "b" * 64, "artifact"),
                      data_sha256="d" * 64, tasks=tasks)


def tasks(**suites):
    return TaskResults(suites=suites, content_sha256="e" * 64)


def by_name(decision):
    return {t.name: t for t in decision.terms}


# ----- parsing --------------------------------------------------------------------------------------
def test_every_term_is_optional_and_a_single_term_is_a_budget():
    b = parse_budget({"kld_mean": 0.01})
    assert b.quality == {"kld_mean": 0.01} and b.needs_scores and not b.needs_bench and not b.needed_suites
    assert parse_budget(None).empty and parse_budget({}).empty


def test_the_default_template_parses_and_holds_the_seed_example(tmp_path):
    path = tmp_path / "budget.yaml"
    assert cli(["budget", "init", "-o", str(path)]) == 0
    assert path.read_text() == DEFAULT_TEMPLATE
    b = load_budget(path)
    assert {s: v["max_drop_pct"] for s, v in b.suites.items()} == {"code": 1.5, "math": 1.5, "json": 1.5, "qa": 1.5}
    assert b.perf == {"ttft_p95_reduction_pct": 20, "tpot_p95_reduction_pct": 20, "memory_reduction_pct": 50}
    assert b.eval_spec().suites == ("code", "math", "json", "qa")
    assert cli(["budget", "init", "-o", str(path)]) == 1  # no silent overwrite


def test_full_budget_parses_every_term():
    b = parse_budget(yaml.safe_load("""
kld_mean: 0.01
kld_p99: 0.2
ppl_increase_pct: 2
top1_agreement: 0.9
ece_increase: 0.01
suites: {math: {max_drop_pct: 1.5}}
no_significant_regression: [code, math]
slices: {code: {kld_mean: 0.05}}
ttft_p95_reduction_pct: 10
tpot_p95_reduction_pct: 10
decode_speedup: 1.2
memory_reduction_pct: {peak_rss: 30, weight_bytes: 50}
cost_per_million_tokens: 0.5
eval: {max_windows: 8, limit: 5}
bench: {price_per_hour: 1.5, output_len: 32}
"""))
    assert set(b.quality) == {"kld_mean", "kld_p99", "ppl_increase_pct", "top1_agreement", "ece_increase"}
    assert b.needed_suites == ("math", "code") and b.slices == {"code": {"kld_mean": 0.05}}
    spec = b.eval_spec()
    assert spec.texts == ("news", "code") and spec.max_windows == 8 and spec.limit == 5  # slice text added
    assert b.eval_spec(limit=2).limit == 2  # CLI overrides win
    assert b.bench_spec("m").output_len == 32 and b.bench_spec("m").price_per_hour == 1.5
    assert parse_budget(b.to_json()) == b  # the JSON form is a budget again


@pytest.mark.parametrize("data, message", [
    ({"kld_meen": 0.01}, "unknown key 'kld_meen'; valid keys: kld_mean"),
    ({"suites": {"math": {"max_drop": 1}}}, "suites.math: unknown key 'max_drop'; valid keys: max_drop_pct"),
    ({"suites": {"math": {}}}, "suites.math has no term"),
    ({"suites": ["math"]}, "suites: expected a mapping"),
    ({"suites": {"math": {"max_drop_pct": 150}}}, "150 is outside"),
    ({"slices": {"code": {"kld": 1}}}, "slices.code: unknown key 'kld'; valid keys: kld_mean"),
    ({"slices": {"code": {}}}, "slices.code has no term"),
    ({"kld_mean": "small"}, "kld_mean: expected a number"),
    ({"kld_mean": True}, "kld_mean: expected a number"),
    ({"kld_mean": -1}, "kld_mean: -1 is outside"),
    ({"kld_mean": float("nan")}, "kld_mean: expected a number"),
    ({"top1_agreement": 1.5}, "top1_agreement: 1.5 is outside"),
    ({"no_significant_regression": {"a": 1}}, "no_significant_regression: expected a list"),
    ({"memory_reduction_pct": {"rss": 5}}, "memory_reduction_pct: unknown key 'rss'; valid keys: peak_rss, weight_bytes"),
    ({"cost_per_million_tokens": 1.0}, "needs bench.price_per_hour"),
    ({"eval": {"windows": 3}}, "eval: unknown key 'windows'; valid keys: ctx, max_windows"),
    ({"eval": {"max_windows": -1}}, "max_windows must be >= 0"),
    ({"eval": {"texts": ["no-such-file.txt"]}}, "no such file"),
    ({"bench": {"outputs": 3}}, "bench: unknown key 'outputs'"),
    ({"bench": {"kv": "int3"}}, "unknown KV cache"),
    ([1, 2], "expected a mapping"),
])
def test_bad_budgets_name_the_bad_key(data, message):
    with pytest.raises(BudgetError, match=None) as e:
        parse_budget(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_unknown_top_key_lists_every_valid_key():
    with pytest.raises(BudgetError) as e:
        parse_budget({"latency": 1})
    assert all(k in str(e.value) for k in TOP_KEYS)


@pytest.mark.parametrize("text, message", [
    ("kld_mean: [0.1\n", "not valid YAML at line 2"),
    ("kld_mean: 0.01\nkld_meen: 1\n", "unknown key 'kld_meen'"),
    ("- kld_mean\n", "expected a mapping"),
])
def test_bad_budget_files_exit_2_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    assert cli(["gate", "base", "cand", "--budget", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1


def test_missing_budget_file_and_empty_budget_exit_2(tmp_path, capsys, tiny_models):
    assert cli(["gate", "base", "cand", "--budget", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    m = str(tiny_models["llama"])
    assert cli(["gate", m, m, "--budget", str(empty)]) == 2
    assert "no terms" in capsys.readouterr().err


# ----- verdicts ---------------------------------------------------------------------------------------
def test_kld_terms_pass_and_fail_on_the_point_estimate_with_its_ci():
    r = report(kld=0.005, stderr=0.001)
    ok = decide(parse_budget({"kld_mean": 0.01}), Evidence(scores=r))
    assert ok.passed and ok.terms[0].measured == 0.005
    lo, hi = ok.terms[0].ci95
    assert lo == pytest.approx(0.005 - 1.96 * 0.001, abs=1e-5) and hi == pytest.approx(0.005 + 1.96 * 0.001, abs=1e-5)
    bad = decide(parse_budget({"kld_mean": 0.001}), Evidence(scores=r))
    assert not bad.passed and [t.name for t in bad.failed] == ["kld_mean"] and "is not <= 0.001" in bad.failed[0].reason


def test_quality_terms_directions():
    r = report(kld=0.005, p99=0.05, ppl_b=10.0, ppl_c=10.3, top1=0.95, ece_b=0.02, ece_c=0.05)
    d = by_name(decide(parse_budget({"kld_p99": 0.04, "ppl_increase_pct": 2.0, "top1_agreement": 0.9,
                                     "ece_increase": 0.02}), Evidence(scores=r)))
    assert not d["kld_p99"].passed  # 0.05 > 0.04
    assert d["ppl_increase_pct"].measured == pytest.approx(3.0) and not d["ppl_increase_pct"].passed
    assert d["ppl_increase_pct"].ci95[0] < 3.0 < d["ppl_increase_pct"].ci95[1]
    assert d["top1_agreement"].passed  # at least 0.9
    assert d["ece_increase"].measured == pytest.approx(0.03) and not d["ece_increase"].passed


def test_suite_drop_is_judged_on_the_upper_bound_of_the_ci():
    budget = parse_budget({"suites": {"math": {"max_drop_pct": 1.5}}})
    # point drop 0.5 pt, CI of the drop [-1.0, 2.0] straddles the 1.5 limit: fails
    straddle = decide(budget, Evidence(tasks=tasks(math=suite(-0.005, (-0.02, 0.01)))))
    t = straddle.terms[0]
    assert t.measured == pytest.approx(0.5) and t.ci95 == pytest.approx((-1.0, 2.0))
    assert not t.passed and "upper bound" in t.reason and t.judged_on == "upper bound of the 95% CI"
    # same point estimate, tight CI [0.2, 0.8] pt: passes
    tight = decide(budget, Evidence(tasks=tasks(math=suite(-0.005, (-0.008, -0.002)))))
    assert tight.passed
    # an improvement passes
    assert decide(budget, Evidence(tasks=tasks(math=suite(0.02, (0.0, 0.04))))).passed


def test_no_significant_regression():
    budget = parse_budget({"no_significant_regression": ["code"]})
    assert decide(budget, Evidence(tasks=tasks(code=suite(-0.01, (-0.03, 0.01))))).passed
    d = decide(budget, Evidence(tasks=tasks(code=suite(-0.1, (-0.15, -0.05), significant=True, p=0.001))))
    assert not d.passed and "significant drop" in d.terms[0].reason
    # a significant improvement is no regression
    assert decide(budget, Evidence(tasks=tasks(code=suite(0.1, (0.05, 0.15), significant=True, p=0.001)))).passed


def test_terms_that_cannot_be_measured_fail_with_the_reason():
    budget = parse_budget({"kld_mean": 0.01, "suites": {"math": {"max_drop_pct": 1}, "qa": {"max_drop_pct": 1}},
                           "slices": {"code": {"kld_mean": 0.05}}, "decode_speedup": 1.1})
    d = by_name(decide(budget, Evidence(scores=report(), tasks=tasks(math=suite(0, (-0.001, 0.001))))))
    assert d["kld_mean"].passed and d["suites.math.max_drop_pct"].passed
    assert not d["suites.qa.max_drop_pct"].passed and "suite 'qa' was not run" in d["suites.qa.max_drop_pct"].reason
    assert not d["slices.code.kld_mean"].passed and "text 'code' was not evaluated" in d["slices.code.kld_mean"].reason
    assert not d["decode_speedup"].passed and d["decode_speedup"].reason.startswith("not measured")
    nothing = decide(budget, Evidence())
    assert not nothing.passed and all(not t.passed and t.measured is None for t in nothing.terms)


def test_slices_are_judged_per_text():
    r = report(texts={"news": scores(kld=0.004), "code": scores(kld=0.08)})
    d = by_name(decide(parse_budget({"slices": {"news": {"kld_mean": 0.05}, "code": {"kld_mean": 0.05}}}),
                       Evidence(scores=r)))
    assert d["slices.news.kld_mean"].passed and not d["slices.code.kld_mean"].passed
    assert d["slices.code.kld_mean"].measured == 0.08


def _bench(ttft, tpot, rss, weights, tok_s, cost=None):
    from quantship.bench.results import BenchModel, BenchReport, SingleStreamStats
    from quantship.specs import BenchSpec

    single = SingleStreamStats(prompt_tokens=128, output_tokens=128, repeats=len(ttft), warmup=1,
                               ttft_s=sorted(ttft)[len(ttft) // 2], prefill_tok_s=1000.0, tpot_s=sorted(tpot)[len(tpot) // 2],
                               decode_tok_s=tok_s, ttft_runs_s=tuple(ttft), tpot_runs_s=tuple(tpot),
                               bytes_per_decoded_token=1e6)
    return BenchReport(mode="single", spec=BenchSpec(model="m"), model=BenchModel("m", True, "w8", "f" * 64, "artifact"),
                       load_s=1.0, weight_bytes=weights, kv_bytes_per_token=1.0, bandwidth_gbs=None,
                       measured_bandwidth_gbs=None, bandwidth_fraction=None, peak_rss_bytes=rss,
                       cost_per_million_output_tokens=cost, machine={}, versions={}, kernels={}, fused_groups=0,
                       decode_path="torch", single=single)


def test_performance_terms_against_the_baseline():
    base = _bench([0.10, 0.11, 0.20], [0.020, 0.021, 0.030], rss=1000, weights=800, tok_s=50)
    cand = _bench([0.05, 0.06, 0.10], [0.015, 0.016, 0.024], rss=600, weights=200, tok_s=65, cost=0.4)
    budget = parse_budget({"ttft_p95_reduction_pct": 40, "tpot_p95_reduction_pct": 25, "decode_speedup": 1.2,
                           "memory_reduction_pct": 50, "cost_per_million_tokens": 0.5, "bench": {"price_per_hour": 1}})
    d = by_name(decide(budget, Evidence(bench_baseline=base, bench_candidate=cand)))
    assert d["ttft_p95_reduction_pct"].measured == pytest.approx(100 * (1 - 0.096 / 0.191)) and d["ttft_p95_reduction_pct"].passed
    assert d["tpot_p95_reduction_pct"].measured == pytest.approx(100 * (1 - 0.0232 / 0.0291), rel=1e-3)
    assert not d["tpot_p95_reduction_pct"].passed  # 20.3% < 25%
    assert d["decode_speedup"].measured == pytest.approx(1.3) and d["decode_speedup"].passed
    assert d["memory_reduction_pct.weight_bytes"].measured == pytest.approx(75) and d["memory_reduction_pct.weight_bytes"].passed
    assert d["memory_reduction_pct.peak_rss"].measured == pytest.approx(40) and not d["memory_reduction_pct.peak_rss"].passed
    assert d["cost_per_million_tokens"].passed


# ----- reuse checks -----------------------------------------------------------------------------------
def test_eval_json_for_other_models_or_data_is_refused(tmp_path):
    from quantship.gate.run import GateError, find_eval_report

    path = tmp_path / "e.json"
    r = report()
    path.write_text(json.dumps(r.to_json()))
    base, cand = {"sha256": "a" * 64}, {"sha256": "b" * 64}
    assert find_eval_report([path], base, cand, "d" * 64) == r
    with pytest.raises(GateError, match="no report for baseline"):
        find_eval_report([path], base, {"sha256": "c" * 64}, None)
    with pytest.raises(GateError, match="measured other evaluation data"):
        find_eval_report([path], base, cand, "9" * 64)
    path.write_text("{not json")
    with pytest.raises(GateError, match="not readable JSON"):
        find_eval_report([path], base, cand, None)


def test_bench_json_for_another_model_is_refused(tmp_path):
    from quantship.gate.run import GateError, find_bench_reports

    b = _bench([0.1], [0.01], 1, 1, 1.0)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(b.to_json()))
    found = find_bench_reports([path], {"sha256": "0" * 64}, {"sha256": "f" * 64})
    assert set(found) == {"candidate"}
    with pytest.raises(GateError, match="neither the baseline"):
        find_bench_reports([path], {"sha256": "0" * 64}, {"sha256": "1" * 64})


def test_gate_cli_exit_2_on_mismatched_eval_json(tiny_models, tmp_path, capsys):
    budget = tmp_path / "b.yaml"
    budget.write_text("kld_mean: 0.01\n")
    path = tmp_path / "e.json"
    path.write_text(json.dumps(report().to_json()))
    m = str(tiny_models["llama"])
    assert cli(["gate", m, m, "--budget", str(budget), "--eval-json", str(path)]) == 2
    assert "has no report for baseline" in capsys.readouterr().err


def test_gate_end_to_end_on_a_tiny_model(tiny_models, tmp_path, capsys):
    """pass / fail exit codes, the JSON's fields, and reuse of its own eval JSON (nothing re-run)."""
    import quantship

    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog; numbers map to a grid."] * 60))
    m = str(tiny_models["llama"])
    art = quantship.quantize(m, "w8", out=tmp_path / "w8", progress=False, log=lambda *a, **k: None)
    loose, tight = tmp_path / "loose.yaml", tmp_path / "tight.yaml"
    settings = f"eval: {{ctx: 32, max_windows: 3, texts: [{text}]}}\n"
    loose.write_text("kld_mean: 1.0\n" + settings)
    tight.write_text("kld_mean: 1.0e-12\n" + settings)
    out = tmp_path / "g.json"
    assert cli(["gate", m, str(art), "--budget", str(loose), "--json", str(out)]) == 0
    g = json.loads(out.read_text())
    assert g["passed"] is True and g["ran"] == ["eval"]
    assert set(g["terms"][0]) == {"name", "limit", "measured", "ci95", "passed", "reason", "judged_on"}
    assert g["models"]["candidate"]["sha256"] == quantship.verify(art)["content_sha256"]
    assert g["eval_data_sha256"] and g["quantship_version"] == quantship.__version__
    assert cli(["gate", m, str(art), "--budget", str(tight), "--json", str(out)]) == 1
    assert "FAIL: kld_mean" in capsys.readouterr().out
    # reuse: an eval JSON of these models and data is used as is
    e = tmp_path / "e.json"
    assert cli(["eval", m, str(art), "--text", str(text), "--ctx", "32", "--max-windows", "3", "--json", str(e)]) == 0
    assert cli(["gate", m, str(art), "--budget", str(loose), "--eval-json", str(e), "--json", str(out)]) == 0
    g = json.loads(out.read_text())
    assert g["ran"] == [] and g["reused"] == {"scores": str(art)}
    # other windows than the gate's: refused
    assert cli(["gate", m, str(art), "--budget", str(loose), "--eval-json", str(e), "--max-windows", "2"]) == 2


def test_gate_benchmarks_both_models_in_their_own_processes_and_reuses_its_bench_json(tiny_models, tmp_path):
    import quantship

    m = str(tiny_models["llama"])
    art = quantship.quantize(m, "w4g32", out=tmp_path / "q", progress=False, log=lambda *a, **k: None)
    budget = tmp_path / "b.yaml"
    budget.write_text("memory_reduction_pct: {weight_bytes: 20}\ndecode_speedup: 0.01\n"
                      "bench: {input_len: 8, output_len: 4, repeats: 2, warmup: 1}\n")
    out = tmp_path / "g.json"
    assert cli(["gate", m, str(art), "--budget", str(budget), "--json", str(out)]) == 0
    g = json.loads(out.read_text())
    assert g["ran"] == ["bench"] and g["bench_settings"]["output_len"] == 4
    terms = {t["name"]: t for t in g["terms"]}
    assert terms["memory_reduction_pct.weight_bytes"]["measured"] > 20 and terms["decode_speedup"]["measured"] > 0
    # each model's bench JSON (quantship bench --json) is reused, matched by sha256 whatever the order
    b_base, b_cand = tmp_path / "base.json", tmp_path / "cand.json"
    args = ["--input-len", "8", "--output-len", "4", "--repeats", "2", "--no-bandwidth"]
    assert cli(["bench", str(art), *args, "--json", str(b_cand)]) == 0
    assert cli(["bench", m, *args, "--json", str(b_base)]) == 0
    assert cli(["gate", m, str(art), "--budget", str(budget), "--bench-json", str(b_cand), "--bench-json", str(b_base),
                "--json", str(out)]) == 0
    g = json.loads(out.read_text())
    assert g["ran"] == [] and g["reused"]["bench"] == "baseline, candidate"


def test_bench_json_with_different_settings_is_refused(tmp_path):
    from dataclasses import replace as dc_replace

    from quantship.gate.run import GateError, find_bench_reports

    a = _bench([0.1], [0.01], 1, 1, 1.0)
    b = dc_replace(a, spec=dc_replace(a.spec, output_len=64), model=dc_replace(a.model, sha256="0" * 64))
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a.to_json()))
    pb.write_text(json.dumps(b.to_json()))
    with pytest.raises(GateError, match="output_len: 64 vs 128"):
        find_bench_reports([pa, pb], {"sha256": "0" * 64}, {"sha256": "f" * 64})
    both = tmp_path / "both.json"  # the gate's own pair file
    both.write_text(json.dumps({"baseline": dc_replace(a, model=dc_replace(a.model, sha256="0" * 64)).to_json(),
                                "candidate": a.to_json()}))
    assert set(find_bench_reports([both], {"sha256": "0" * 64}, {"sha256": "f" * 64})) == {"baseline", "candidate"}
