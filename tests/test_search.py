"""Mixed-precision search: the knapsack against brute force, the promote step, the CLI, the JSON."""

from __future__ import annotations

import functools
import itertools
import json
import math
import random

import pytest

from quantship.cli import main as cli
from quantship.formats.scheme import parse_scheme
from quantship.models.arch import arch_facts
from quantship.pipeline import find_targets
from quantship.search import SearchSpec, brute_force, run_search, solve_max_bits, solve_min_bits
from quantship.search import loop as search_loop
from quantship.search.assign import total
from quantship.search.sensitivity import group_bits, layer_groups
from quantship.specs import QuantSpec

from conftest import build_tiny_model

LADDER = ("w8", "w4g64", "nf4g64", "w3g64")
CALIB = dict(calib="news", calib_samples=2, calib_seqlen=32)


@functools.lru_cache(maxsize=None)
def tiny_bits_table(arch: str = "llama"):
    model, _ = build_tiny_model(arch)
    targets = find_targets(model, arch_facts(model.config.model_type), QuantSpec(scheme="w8"))
    groups = layer_groups(model, targets)
    bits = [[group_bits(g, targets, parse_scheme(s)) for s in LADDER] for g in groups]
    return groups, bits, sum(g.weights for g in groups)


def test_groups_are_the_linears_sharing_an_input():
    groups, _, _ = tiny_bits_table()
    names = [g.name for g in groups]
    assert names[:4] == ["model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_proj+up_proj", "model.layers.0.mlp.down_proj"]
    assert len(groups) == 8 and sum(len(g.layers) for g in groups) == 14


@pytest.mark.parametrize("seed", range(6))
def test_max_bits_assignment_equals_brute_force_on_a_tiny_model(seed):
    groups, bits, weights = tiny_bits_table()
    rng = random.Random(seed)
    # losses that fall with bits, with noise, so the optimum is not just "most bits first"
    loss = [[rng.uniform(0.5, 1.5) * 2.0 ** (-b / g.weights) * (1 + 10 * rng.random()) for b in row]
            for g, row in zip(groups, bits)]
    for bpw in (3.25, 3.6, 4.25, 4.6, 5.5, 8.1):
        budget = math.floor(bpw * weights)
        dp, bf = solve_max_bits(bits, loss, budget), brute_force(bits, loss, budget)
        assert dp.exact
        assert dp.bits <= budget
        assert dp.loss == pytest.approx(bf.loss, rel=1e-12)
        assert dp.choice == bf.choice


@pytest.mark.parametrize("seed", range(4))
def test_min_bits_assignment_equals_brute_force(seed):
    groups, bits, weights = tiny_bits_table()
    rng = random.Random(100 + seed)
    loss = [[rng.random() * (r + 0.2) for r in range(len(row))] for row in bits]  # rung 0 (w8) the least
    totals = [total(bits, loss, c) for c in itertools.product(*[range(len(r)) for r in bits])]
    lo, hi = min(l_ for _, l_ in totals), max(l_ for _, l_ in totals)
    for limit in (lo * 1.01, lo + 0.2 * (hi - lo), lo + 0.5 * (hi - lo), hi):
        found = solve_min_bits(bits, loss, limit)
        fewest = min(b for b, l_ in totals if l_ <= limit)
        assert found.loss <= limit and found.bits == fewest


def test_rounded_dp_stays_within_budget_and_is_marked_inexact():
    rng = random.Random(7)
    bits = [[rng.randrange(10_000, 90_000) for _ in range(3)] for _ in range(6)]
    loss = [[rng.random() for _ in range(3)] for _ in range(6)]
    budget = 300_000
    dp = solve_max_bits(bits, loss, budget, max_cells=50)
    assert not dp.exact and dp.bits <= budget
    assert dp.loss >= brute_force(bits, loss, budget).loss - 1e-12


def test_budget_below_the_cheapest_assignment_is_refused():
    _, bits, weights = tiny_bits_table()
    loss = [[1.0] * 4 for _ in bits]
    with pytest.raises(ValueError, match="below the cheapest assignment"):
        solve_max_bits(bits, loss, int(3.0 * weights))


def test_promote_pins_the_worst_groups_one_rung_up():
    bits = [[800, 425, 425, 325], [800, 425, 425, 325], [800, 425, 425, 325]]
    loss = [[0.0, 1.0, 1.1, 3.0], [0.0, 5.0, 4.0, 9.0], [0.0, 0.1, 0.2, 0.3]]
    pins: dict[int, int] = {}
    promoted = search_loop.promote_worst(bits, loss, (3, 2, 0), pins, k=2)
    assert promoted == [1, 0]  # group 1 (loss 4.0 at nf4g64), then group 0 (3.0 at w3g64); group 2 is at w8
    assert pins == {1: 800, 0: 425}  # nf4g64 -> w8; w3g64 -> the next rung with more bits (w4g64/nf4g64)
    table = search_loop.pinned(bits, pins)
    assert table[0] == [800, 425, 425, None] and table[1] == [800, None, None, None] and table[2] == bits[2]
    assert search_loop.promote_worst(bits, loss, (0, 0, 0), {}, k=2) == []  # ladder exhausted


def _underestimating(monkeypatch, factor: float):
    """Make the sensitivity predict `factor` x the Fisher proxy, so the first mix misses."""
    original = search_loop_sensitivity().fisher_table

    def scaled(*args, **kwargs):
        return [[None if v is None else v * factor for v in row] for row in original(*args, **kwargs)]
    monkeypatch.setattr(search_loop_sensitivity(), "fisher_table", scaled)


def search_loop_sensitivity():
    from quantship.search import sensitivity
    return sensitivity


def test_quality_budget_loop_promotes_until_the_measured_kld_holds(tiny_models, monkeypatch):
    base = run_search(SearchSpec(model=str(tiny_models["llama"]), max_kld=1.0, **CALIB), progress=False, log=None)
    w3_only = base.final  # a loose budget: every group at the cheapest rung holds it
    assert w3_only.holds and w3_only.bits_per_weight == pytest.approx(3.25)
    limit = w3_only.measured * 0.3  # all-w3g64 misses this
    _underestimating(monkeypatch, 0.05)
    result = run_search(SearchSpec(model=str(tiny_models["llama"]), max_kld=limit, max_iters=8, promote=2, **CALIB),
                        progress=False, log=None)
    its = result.iterations
    assert not its[0].holds and its[0].measured > limit and its[0].predicted <= limit
    assert its[0].action.startswith("promote ")
    for before, after in zip(its, its[1:]):  # promoted groups take more bits next time
        named = [n for n in before.action.removeprefix("promote ").split(", ")]
        for name in named:
            g = [grp.name for grp in result.groups].index(name)
            assert result.bits[g][after.choice[g]] > result.bits[g][before.choice[g]]
    assert result.final.holds and result.final.measured <= limit
    assert result.final.bits_per_weight > w3_only.bits_per_weight


def test_bits_budget_loop_stays_within_the_budget(tiny_models, monkeypatch):
    _underestimating(monkeypatch, 0.2)
    result = run_search(SearchSpec(model=str(tiny_models["llama"]), max_bpw=4.5, tolerance=0.0, max_iters=3,
                                   **CALIB), progress=False, log=None)
    assert len(result.iterations) >= 2 and result.iterations[0].action.startswith("promote ")
    assert all(it.bits_per_weight <= 4.5 for it in result.iterations)
    assert result.final.measured == min(it.measured for it in result.iterations)


def test_an_unreachable_quality_budget_exhausts_the_ladder(tiny_models):
    result = run_search(SearchSpec(model=str(tiny_models["llama"]), ladder=("w8", "w3g64"), max_kld=1e-12,
                                   max_iters=20, promote=4, **CALIB), progress=False, log=None)
    assert not result.final.holds
    assert result.iterations[-1].action == "ladder exhausted"
    assert set(result.iterations[-1].choice) == {0}  # every group at w8, the ladder's top


def test_cli_search_writes_json_and_an_artifact_recording_the_mix(tiny_models, tmp_path, capsys):
    out, js = tmp_path / "mix", tmp_path / "search.json"
    assert cli(["search", str(tiny_models["llama"]), "--max-bpw", "4.6", "--calib", "news", "--calib-samples", "2",
                "--calib-seqlen", "32", "-o", str(out), "--json", str(js)]) == 0
    assert "chosen mix" in capsys.readouterr().out
    data = json.loads(js.read_text())
    assert {"model", "method", "ladder", "target", "sensitivity", "calibration", "iterations", "final",
            "artifact", "timings"} <= set(data)
    assert data["target"] == {"max_bpw": 4.6} and data["ladder"] == list(LADDER)
    for it in data["iterations"]:
        assert {"iteration", "bits_per_weight", "predicted_kld", "measured_kld", "holds", "action"} <= set(it)
    final = data["final"]
    manifest = json.loads((out / "quantship.json").read_text())
    assert {row["layer"]: row["scheme"] for row in final["layers"]} == \
        {name: m["scheme"] for name, m in manifest["modules"].items()}
    assert manifest["overrides"] == final["overrides"] and manifest["scheme"] == final["default_scheme"]
    assert manifest["bits_per_weight"]["quantized_layers"] == pytest.approx(final["bits_per_weight"], abs=1e-4)
    assert final["bits_per_weight"] <= 4.6
    assert len(data["sensitivity"]["groups"]) == 8
    assert all(set(g["loss"]) == set(LADDER) for g in data["sensitivity"]["groups"])


@pytest.mark.parametrize("argv, message", [
    (["--ladder", "w8,w9x", "--max-bpw", "4"], "--ladder rung 'w9x'"),
    (["--max-bpw", "2.5"], "below the cheapest rung of the ladder: w3g64"),
    (["--max-bpw", "3.1"], "below the cheapest mix of this ladder: 3.2500"),
    (["--ladder", "w8,w8", "--max-bpw", "9"], "names a scheme twice"),
    (["--max-bpw", "4", "--sensitivity", "hessian"], "unknown sensitivity 'hessian'"),
])
def test_cli_bad_input_is_refused_with_a_clear_error(tiny_models, argv, message, capsys):
    assert cli(["search", str(tiny_models["llama"]), *argv]) == 1
    assert message in capsys.readouterr().err


def test_cli_needs_exactly_one_target(tiny_models, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli(["search", str(tiny_models["llama"])])
    assert e.value.code == 2
    budget = tmp_path / "b.yaml"
    budget.write_text("kld_mean: 0.01\n")
    with pytest.raises(SystemExit):
        cli(["search", str(tiny_models["llama"]), "--max-bpw", "4", "--budget", str(budget)])


@pytest.mark.parametrize("text, message", [
    ("kld_mean: 0.01\nkld_p99: 0.1\n", "key(s) kld_p99 are not searched on; the search holds kld_mean"),
    ("ppl_increase_pct: 2\n", "key(s) ppl_increase_pct"),
    ("kld_mean: -1\n", "kld_mean must be a positive number"),
    ("[1, 2]\n", "must be a mapping"),
    ("kld_mean: [\n", "not valid YAML"),
])
def test_bad_budget_files_are_refused_by_name(tiny_models, tmp_path, text, message, capsys):
    budget = tmp_path / "budget.yaml"
    budget.write_text(text)
    assert cli(["search", str(tiny_models["llama"]), "--budget", str(budget)]) == 1
    assert message in capsys.readouterr().err
