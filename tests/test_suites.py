"""Suites as data, the user JSONL format, generation and run_suites end to end on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_model
from quantship.evaluate.generate import cut_at_stop, generate, render_prompt
from quantship.evaluate.suites import (Item, SuiteContext, filler_path, in_small_subset, humaneval_problems,
                                       load_jsonl, load_suite, multilingual_texts, needle_haystack, score_slices,
                                       suite_names)
from quantship.evaluate.tasks import render_tables, run_suites

GEN_SUITES = ("code", "math", "json", "qa", "refusal", "long")


@pytest.fixture(scope="module")
def pair():
    """A tiny random-init llama and a noisy copy of it (two random inits decode identically here)."""
    model, tok = build_tiny_model("llama", seed=0)
    return (model, tok), (_perturbed(model), tok)


# ----------------------------------------------------------------------------- built-in data

def test_builtin_suite_sizes():
    assert set(suite_names()) == {*GEN_SUITES, "multilingual"}
    sizes = {n: len(load_suite(n, context=SuiteContext(max_context=1024)).items) for n in GEN_SUITES}
    assert sizes == {"code": 21, "math": 32, "json": 20, "qa": 30, "refusal": 20, "long": 9}
    refusal = load_suite("refusal").items
    assert sum(it.reference == "refuse" for it in refusal) == 10


def test_code_suite_subset_rule_and_full():
    problems = humaneval_problems()
    assert len(problems) == 164
    small = load_suite("code").items
    assert [it.id for it in small][:3] == ["HumanEval/2", "HumanEval/7", "HumanEval/15"]
    assert all(in_small_subset(p) == (p["task_id"] in {it.id for it in small}) for p in problems)
    assert len(load_suite("code", full=True).items) == 164
    assert all(it.checker == "code" and it.base_prompt and "\ndef " in it.base_stop for it in small)
    assert all(it.base_prompt in it.prompt and "```python" in it.prompt for it in small)


def test_builtin_references_pass_their_own_checkers():
    """Each canonical HumanEval solution passes (subset); every math reference checks against itself."""
    from quantship.evaluate.checkers import check

    by_id = {p["task_id"]: p for p in humaneval_problems()}
    for it in load_suite("code").items[:3]:
        assert check("code", by_id[it.id]["canonical_solution"], it).passed, it.id
    for it in load_suite("math").items:
        assert check("math", f"The answer is {it.reference}.", it).passed, it.id
    for it in load_suite("qa").items:
        assert check(it.checker, f"I think it is {it.answers[0]}.", it).passed, it.id


def test_long_suite_places_needle_at_depth():
    sents = [f"Sentence number {i} is here." for i in range(100)]
    lengths = [5] * 100
    text = needle_haystack(200, 0.5, "NEEDLE.", sents, lengths)
    assert text.count("NEEDLE.") == 1
    assert abs(text.index("NEEDLE.") / len(text) - 0.5) < 0.05
    assert needle_haystack(200, 0.0, "NEEDLE.", sents, lengths).startswith("NEEDLE.")
    assert needle_haystack(200, 1.0, "NEEDLE.", sents, lengths).endswith("NEEDLE.")
    assert text.count("Sentence number") == 40  # 40 sentences of 5 tokens fill the 200-token budget
    assert filler_path().name == "lee_background.cor"
    import sys
    assert "gensim" not in sys.modules  # read as a file, never imported


def test_long_suite_fits_context_with_real_tokenizer(pair):
    (_, tok), _ = pair
    suite = load_suite("long", context=SuiteContext(tokenizer=tok, max_context=512, seed=3))
    for it in suite.items:
        n = len(tok(it.prompt)["input_ids"])
        assert n + it.max_tokens <= 512, (it.id, n)
        assert it.answers[0] in it.prompt
    again = load_suite("long", context=SuiteContext(tokenizer=tok, max_context=512, seed=3))
    assert [i.answers for i in again.items] == [i.answers for i in suite.items]  # seeded


def test_multilingual_texts_and_score_slices():
    texts = multilingual_texts()
    assert {"en", "de", "zh", "ar", "identifiers"} <= set(texts)
    assert all(len(v) >= 2 for v in texts.values())
    seen = []
    out = score_slices(lambda t: seen.append(t) or {"chars": len(t)}, {"a": ["x", "yy"], "b": ["z"]})
    assert out == {"a": {"chars": 5}, "b": {"chars": 1}} and seen == ["x\n\nyy", "z"]


# ----------------------------------------------------------------------------- user JSONL

def test_user_jsonl_roundtrip(tmp_path):
    p = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "2+2?", "checker": "math", "reference": "4", "max_tokens": 8, "stop": ["\n"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
         "checker": "qa", "answers": ["Lima"]},
        {"id": "j", "prompt": "JSON please", "checker": "json", "schema": {"type": "object"}},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    suite = load_jsonl(p)
    assert suite.name == "mine" and [it.id for it in suite.items] == ["mine-1", "mine-2", "j"]
    assert suite.items[0].stop == ("\n",) and suite.items[0].max_tokens == 8
    assert suite.items[1].messages[1]["content"] == "Capital of Peru?"


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "x", "checker": "qa", "answers": ["a"]', "not valid JSON"),
    ('{"prompt": "x", "checker": "nope"}', "unknown checker 'nope'"),
    ('{"prompt": "x", "checker": "qa", "answer": ["a"]}', "unknown key(s) ['answer']"),
    ('{"prompt": "x"}', "missing 'checker'"),
    ('{"checker": "qa", "answers": ["a"]}', "exactly one of 'prompt'"),
    ('{"prompt": "x", "checker": "json"}', "needs 'schema'"),
    ('{"prompt": "x", "checker": "qa", "answers": ["a"], "max_tokens": 0}', "positive integer"),
    ('{"messages": [{"role": "bot", "content": "x"}], "checker": "qa", "answers": ["a"]}', "role must be"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_user_jsonl_names_the_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "ok", "checker": "qa", "answers": ["ok"]})
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{good}\n\n{good}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_jsonl(p)
    assert f"{p}:4:" in str(e.value) and message in str(e.value)


def test_empty_or_missing_user_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no items"):
        load_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_item_validation_direct():
    with pytest.raises(ValueError, match="'tests'"):
        Item(id="c", checker="code", prompt="def f():\n")
    with pytest.raises(ValueError, match="refuse"):
        Item(id="r", checker="refusal", prompt="hi", reference="yes")


# ----------------------------------------------------------------------------- generation

def test_render_prompt_plain_and_chat(pair):
    (_, tok), _ = pair
    it = Item(id="a", checker="qa", prompt="Hi there", answers=("x",))
    assert render_prompt(tok, it) == ("Hi there", True, ())
    chat_tok = build_tiny_model("llama")[1]
    chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    text, special, _ = render_prompt(chat_tok, it)
    assert text == "<user>Hi there\n<assistant>" and special is False
    raw = Item(id="b", checker="qa", prompt="def f():", answers=("x",), raw=True, stop=("\n",))
    assert render_prompt(chat_tok, raw) == ("def f():", True, ("\n",))
    both = Item(id="c", checker="qa", prompt="Write f.", base_prompt="def f():", base_stop=("\ndef ",),
                answers=("x",), stop=("END",))
    assert render_prompt(tok, both) == ("def f():", True, ("\ndef ",))  # no chat template: base prompt
    assert render_prompt(chat_tok, both)[0] == "<user>Write f.\n<assistant>"
    assert render_prompt(chat_tok, both)[2] == ("END",)


def test_cut_at_stop():
    assert cut_at_stop("abc\ndef x\nmore", ["\ndef ", "zz"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_generate_greedy_batched_equals_unbatched_and_respects_limits(pair):
    (model, tok), _ = pair
    items = [Item(id=str(i), checker="qa", prompt=p, answers=("x",), max_tokens=m)
             for i, (p, m) in enumerate([("The quick brown fox", 6), ("def add(a, b):", 4), ("Quantization", 9)])]
    batched = generate(model, tok, items, batch_size=3, progress=False)
    single = [generate(model, tok, [it], batch_size=1, progress=False)[0] for it in items]
    assert batched == single
    for it, out in zip(items, batched):
        assert len(tok(out, add_special_tokens=False)["input_ids"]) <= it.max_tokens
    again = generate(model, tok, items, batch_size=2, progress=False)
    assert again == batched  # greedy: deterministic


def test_generate_stops_at_stop_string(pair):
    (model, tok), _ = pair
    it = Item(id="s", checker="qa", prompt="The quick", answers=("x",), max_tokens=24)
    full = generate(model, tok, [it], progress=False)[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = generate(model, tok, [Item(id="s", checker="qa", prompt="The quick", answers=("x",), max_tokens=24,
                                     stop=(stop,))], progress=False)[0]
    assert cut == full[: full.index(stop)]


def test_plan_batches_row_and_token_budgets():
    from quantship.evaluate.generate import plan_batches

    lengths = [900, 10, 400, 12, 1900, 11, 410, 950, 1950]
    batches = plan_batches(lengths, batch_size=2, max_batch_tokens=4000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every item exactly once
    assert all(len(b) <= 2 and len(b) * max(lengths[i] for i in b) <= 4000 for b in batches)
    assert [[lengths[i] for i in b] for b in batches] == [[10, 11], [12, 400], [410, 900], [950, 1900], [1950]]
    assert plan_batches([5000], batch_size=8, max_batch_tokens=100) == [[0]]  # too long: alone, never dropped
    assert plan_batches([], batch_size=8, max_batch_tokens=100) == []


def test_code_outputs_stop_after_first_complete_block():
    from quantship.evaluate.checkers.programs import end_of_first_code_block, extract_code
    from quantship.evaluate.generate import finish_output

    full = "Here:\n```python\ndef f(x):\n    return x\n```\nExplanation...\n```python\nprint(1)\n```"
    cut = finish_output(full, (), code_block=True)
    assert cut == "Here:\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(cut) == extract_code(full)
    assert finish_output(full, (), code_block=False) == full
    assert end_of_first_code_block("```python\nopen block") is None
    assert end_of_first_code_block("```bash\nls\n```") is None  # not a python fence: the checker ignores it too
    # every prefix that already holds the first complete block gives the checker the same code
    for n in range(len(full) + 1):
        if end_of_first_code_block(full[:n]) is not None:
            assert extract_code(finish_output(full[:n], (), True)) == extract_code(full)


def test_generate_rows_with_different_limits_and_code_stop(pair):
    """Rows of one batch stop at their own max_tokens; a code item's output ends at its block."""
    from quantship.evaluate.generate import _StopOnStrings

    (model, tok), _ = pair
    items = [Item(id=str(i), checker="qa", prompt="The quick brown fox", answers=("x",), max_tokens=m)
             for i, m in enumerate((3, 12))]
    together = generate(model, tok, items, batch_size=2, progress=False)
    alone = [generate(model, tok, [it], batch_size=1, progress=False)[0] for it in items]
    assert together == alone
    ids = torch.zeros((2, 7), dtype=torch.long)
    stopper = _StopOnStrings(tok, 4, [(), ()], [False, False], [3, 5])
    assert stopper(ids, None).tolist() == [True, False]  # 3 new tokens: row 0 is at its limit


def test_eos_token_id_zero_is_kept():
    """EOS id 0 in the generation config is a real EOS (it used to be dropped as falsy)."""
    from types import SimpleNamespace

    from quantship.evaluate.generate import eos_token_ids

    def model(eos):
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))

    tok = SimpleNamespace(eos_token_id=5)
    assert eos_token_ids(model(0), tok) == [0]
    assert eos_token_ids(model([0, 7]), tok) == [0, 7]
    assert eos_token_ids(model(None), tok) == [5]
    assert eos_token_ids(model(None), SimpleNamespace(eos_token_id=None)) == []


@pytest.mark.parametrize("scheme", ["w8", "w4g32-asym", "w8a8", "w8a8-static"])
def test_dequantized_once_is_bitwise_exact(tiny_models, tmp_path, scheme):
    """Caching each QuantLinear's dequantized weight changes no bit of logits or greedy outputs."""
    import quantship
    from quantship.evaluate.fastpath import dequantized_once
    from quantship.formats.linear import QuantLinear

    art = quantship.quantize(str(tiny_models["llama"]), scheme.removesuffix("-static"), out=tmp_path / scheme,
                             progress=False, log=lambda *a: None)
    model, tok = quantship.load(art)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers
    if scheme.endswith("-static"):  # one calibrated activation scale per layer instead of per token
        for m in layers:
            m.set_act_scale(0.02)
    ids = torch.tensor([tok("The quick brown fox jumps over")["input_ids"]])
    items = [Item(id=str(i), checker="qa", prompt=p, answers=("x",), max_tokens=8)
             for i, p in enumerate(["The quick brown", "def add(a, b):", "Quantization maps"])]
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    ref_out = generate(model, tok, items, progress=False)
    with dequantized_once(model):
        assert all(m.kernel is not None for m in layers)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref_logits)
        assert generate(model, tok, items, progress=False) == ref_out
    assert all(m.kernel is None for m in layers)  # restored


# ----------------------------------------------------------------------------- run_suites

def test_run_suites_end_to_end(pair, tmp_path):
    baseline, candidate = pair
    res = run_suites(baseline, candidate, [*GEN_SUITES, "multilingual"], limit=2, seed=0, out_dir=tmp_path)
    assert set(res) == {*GEN_SUITES, "multilingual"}
    for name in GEN_SUITES:
        r = res[name]
        assert r["n"] == 2
        assert set(r) >= {"baseline", "candidate", "delta", "ci95", "p_value", "significant", "flips", "n",
                          "content_hash"}
        assert r["delta"] == pytest.approx(r["candidate"] - r["baseline"])
        assert r["ci95"][0] <= r["delta"] <= r["ci95"][1]
        assert r["flips"]["pass_to_fail"] + r["flips"]["fail_to_pass"] <= 2
        assert 0.0 <= r["p_value"] <= 1.0 and not r["significant"]  # 2 items can never be significant
        assert len(r["content_hash"]) == 64
        rows = [json.loads(x) for x in (tmp_path / f"tasks-{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        assert set(rows[0]) >= {"prompt", "baseline_output", "candidate_output", "baseline_pass", "candidate_pass"}
    assert {"refusal_rate", "behaviour_agreement"} <= set(res["refusal"])
    ml = res["multilingual"]["slices"]
    assert set(ml) == set(multilingual_texts())
    assert all(v["kld_mean"] > 0 and v["tokens"] > 10 for v in ml.values())
    render_tables(res)  # renders without error


def _perturbed(model, scale: float = 0.5, seed: int = 123):
    """A copy of the model with Gaussian noise on every weight: a stand-in for a bad quantization."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return m


def test_run_suites_same_model_and_known_flips(pair, tmp_path):
    """Items whose expected answer is the baseline's own output: every item flips pass->fail."""
    (b_model, tok), candidate = pair
    prompts = ["The quick brown", "def add(a, b):", "Quantization maps", "Perplexity and", "The lazy dog",
               "return a", "over the", "small grid of"]
    probe = [Item(id=str(i), checker="exact", prompt=p, answers=("-",), max_tokens=6) for i, p in enumerate(prompts)]
    outs = generate(b_model, tok, probe, progress=False)
    cand_outs = generate(candidate[0], tok, probe, progress=False)
    assert all(o.strip() and o.strip() != c.strip() for o, c in zip(outs, cand_outs))
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "checker": "exact", "answers": [o], "max_tokens": 6}) + "\n"
                            for p, o in zip(prompts, outs)), encoding="utf-8")
    same = run_suites((b_model, tok), (b_model, tok), [], suite_files=[path], seed=1)
    assert same["own"]["baseline"] == same["own"]["candidate"] == 1.0
    assert same["own"]["p_value"] == 1.0 and same["own"]["ci95"] == [0.0, 0.0]
    diff = run_suites((b_model, tok), candidate, [], suite_files=[path], seed=1, out_dir=tmp_path)
    r = diff["own"]
    assert r["flips"] == {"pass_to_fail": 8, "fail_to_pass": 0} and r["delta"] == -1.0
    assert r["p_value"] == pytest.approx(2 / 2**8) and r["ci95"] == [-1.0, -1.0] and r["significant"]
    assert len(r["worst_flips"]) == 5
    again = run_suites((b_model, tok), candidate, [], suite_files=[path], seed=1)
    assert again["own"]["content_hash"] == r["content_hash"]  # reproducible


def test_run_suites_rejects_unknown_suite(pair):
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(pair[0], pair[1], ["nope"])
    with pytest.raises(ValueError, match="no suites"):
        run_suites(pair[0], pair[1], [])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
                        max_size=60), min_size=1, max_size=4))
def test_user_jsonl_errors_are_value_errors_with_line_numbers(lines):
    from quantship.evaluate.suites import parse_jsonl

    text = "\n".join(lines)
    try:
        items = parse_jsonl(text, source="f.jsonl", name="f")
    except ValueError as e:
        assert str(e).startswith("f.jsonl:")
    else:
        assert items


def test_render_tables_shows_regressions(pair, tmp_path):
    from rich.console import Console

    (b_model, tok), candidate = pair
    prompts = ["The quick brown", "def add(a, b):", "Quantization maps", "Perplexity and", "The lazy dog", "over the"]
    outs = generate(b_model, tok, [Item(id=str(i), checker="exact", prompt=p, answers=("-",), max_tokens=6)
                                   for i, p in enumerate(prompts)], progress=False)
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": f"item{i}", "prompt": p, "checker": "exact", "answers": [o],
                                        "max_tokens": 6}) + "\n" for i, (p, o) in enumerate(zip(prompts, outs))))
    res = run_suites((b_model, tok), candidate, [], suite_files=[path])
    console = Console(record=True, width=200)
    render_tables(res, console=console)
    text = console.export_text()
    assert "mine" in text and "significant" in text and "item0" in text and "-1.000" in text
