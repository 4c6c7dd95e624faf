"""lm-evaluation-harness interop: packaged local tasks on tiny models and a quantized artifact.

The end-to-end tests need the optional `lm-eval` package (`pip install "quantship[harness]"`; the
`test` extra installs it too) and skip with that reason without it. The task-config tests need only
PyYAML.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import quantship
from conftest import build_tiny_model
from quantship.evaluate import harness
from quantship.evaluate.harness import load_task_config, local_task_names, run_harness

LIMIT = 4
needs_lm_eval = pytest.mark.skipif(not harness.harness_available(),
                                   reason='lm-eval not installed: pip install "quantship[harness]" (lm-eval==0.4.13)')


# ----------------------------------------------------------------------------- task configs (no lm-eval)

def test_packaged_tasks_resolve_to_local_files():
    assert local_task_names() == ["quantship_gen", "quantship_mc"]
    mc = load_task_config("quantship_mc")
    gen = load_task_config("quantship_gen")
    assert mc["output_type"] == "multiple_choice" and gen["output_type"] == "generate_until"
    for cfg in (mc, gen):
        assert cfg["dataset_path"] == "json"
        path = cfg["dataset_kwargs"]["data_files"]["test"]
        assert path.startswith("/") and path.endswith(".jsonl")
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert len(rows) == 40
    rows = [json.loads(line) for line in open(mc["dataset_kwargs"]["data_files"]["test"], encoding="utf-8")]
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)


def test_user_task_yaml_relative_data(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "1+1?", "a": "2"}\n')
    (tmp_path / "t.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     "    test: [d.jsonl]\ntest_split: test\noutput_type: generate_until\n")
    cfg = load_task_config(str(tmp_path / "t.yaml"))
    assert cfg["dataset_kwargs"]["data_files"] == {"test": [str(tmp_path / "d.jsonl")]}


@pytest.mark.parametrize("body, match", [
    ("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files: hf://datasets/a/b.jsonl\n", "remote"),
    ("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files: missing.jsonl\n", "does not exist"),
    ("task: x\nprocess_docs: !function utils.process_docs\n", "tags"),
    ("include: base.yaml\ntask: x\n", "include"),
    ("- just a list\n", "mapping"),
])
def test_bad_task_yaml_is_refused(tmp_path, body, match):
    (tmp_path / "t.yaml").write_text(body)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_task_config(str(tmp_path / "t.yaml"))


def test_unknown_task_names_the_packaged_ones():
    with pytest.raises(ValueError, match="quantship_gen, quantship_mc"):
        load_task_config("hellaswag")
    with pytest.raises(FileNotFoundError):
        load_task_config("nope.yaml")


# ----------------------------------------------------------------------------- end to end (lm-eval)

def _check_metrics(result: dict, limit: int) -> None:
    assert set(result["tasks"]) == {"quantship_mc", "quantship_gen"}
    mc, gen = result["tasks"]["quantship_mc"], result["tasks"]["quantship_gen"]
    assert set(mc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert set(gen) == {"exact_match", "exact_match_stderr", "n"}
    assert mc["n"] == gen["n"] == limit
    for metrics in (mc, gen):
        for key, value in metrics.items():
            if key != "n":
                assert 0.0 <= value <= 1.0 and math.isfinite(value), (key, value)
                if not key.endswith("_stderr"):
                    assert (value * limit) == pytest.approx(round(value * limit))  # a count over `limit` docs


@needs_lm_eval
def test_harness_on_float_model_matches_direct_loglikelihood():
    """Both packaged tasks run; lm-eval's loglikelihoods are the model's own (computed here directly)."""
    model, tok = build_tiny_model("llama", seed=0)
    result = run_harness((model, tok), limit=LIMIT, batch_size=2, log_samples=True)
    _check_metrics(result, LIMIT)
    assert result["lm_eval_version"] == "0.4.13"

    sample = result["samples"]["quantship_mc"][0]
    doc = sample["doc"]
    context = f"Question: {doc['question']}\nAnswer:"
    for choice, resp in zip(doc["choices"], sample["resps"]):
        ctx_ids = tok(context)["input_ids"]
        whole = tok(context + " " + choice)["input_ids"]
        assert whole[: len(ctx_ids)] == ctx_ids  # the continuation tokenises on its own here
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx_ids), len(whole)))
        assert resp[0][0] == pytest.approx(want, abs=1e-3)
    gen = result["samples"]["quantship_gen"][0]
    assert isinstance(gen["filtered_resps"][0], str) and "\n" not in gen["filtered_resps"][0]


@needs_lm_eval
def test_harness_on_quantized_artifact_and_cli(tiny_models, tmp_path):
    """A w8 artifact goes through the same path (its layers are QuantLinear), also from the CLI."""
    from quantship.cli import main
    from quantship.formats.linear import QuantLinear

    art = quantship.quantize(str(tiny_models["llama"]), "w8", out=tmp_path / "w8", progress=False,
                             log=lambda *a: None)
    model, tok = quantship.load(art)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    by_pair = run_harness((model, tok), limit=LIMIT, batch_size=3)
    _check_metrics(by_pair, LIMIT)

    out = tmp_path / "h.json"
    assert main(["harness", str(art), "--limit", str(LIMIT), "--json", str(out)]) == 0
    by_path = json.loads(out.read_text())
    _check_metrics(by_path, LIMIT)
    assert by_path["model"] == str(art)
    for task in ("quantship_mc", "quantship_gen"):  # batch size does not change the scores
        assert by_path["tasks"][task] == pytest.approx(by_pair["tasks"][task])


@needs_lm_eval
def test_harness_rejects_bad_arguments():
    model, tok = build_tiny_model("llama")
    with pytest.raises(ValueError, match="limit"):
        run_harness((model, tok), limit=0)
    with pytest.raises(ValueError, match="tokenizer"):
        run_harness(model, ["quantship_mc"], limit=1)
    with pytest.raises(ValueError, match="no tasks"):
        run_harness((model, tok), [], limit=1)
