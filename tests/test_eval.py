"""KLD / perplexity evaluation: definitions checked against direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

import quantship
from quantship.cli import main as cli
from quantship.evaluate.compare import compare
from quantship.evaluate.metrics import make_windows
from quantship.specs import EvalSpec

from conftest import build_tiny_model

TEXT = " ".join(["The quick brown fox jumps over the lazy dog and quantization maps numbers to a grid."] * 40)


@pytest.fixture(scope="module")
def pair():
    return build_tiny_model("llama", seed=0)


def test_identical_models_have_zero_kld_and_full_agreement(pair, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    rep = compare(pair, pair, texts=[str(f)], spec=EvalSpec(ctx=32, max_windows=0), progress=False)
    assert rep.kld.mean == pytest.approx(0.0, abs=1e-9)
    assert rep.top1_agreement == 1.0
    assert rep.ppl.baseline == pytest.approx(rep.ppl.candidate)
    assert rep.delta_p.rms == pytest.approx(0.0, abs=1e-9)
    assert rep.ece.baseline == pytest.approx(rep.ece.candidate) and 0 <= rep.ece.baseline <= 1


def test_statistics_match_a_direct_computation(pair, tmp_path):
    base_model, tok = pair
    cand_model, _ = build_tiny_model("llama", seed=1)
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    ctx = 32
    rep = compare(pair, (cand_model, tok), texts=[str(f)], spec=EvalSpec(ctx=ctx, max_windows=3, batch_size=2),
                  progress=False)
    windows = make_windows(tok(TEXT, add_special_tokens=False)["input_ids"], ctx, 3)
    with torch.no_grad():
        lb = torch.log_softmax(base_model(windows).logits, -1)[:, ctx // 2 : -1]
        lc = torch.log_softmax(cand_model(windows).logits, -1)[:, ctx // 2 : -1]
    targets = windows[:, ctx // 2 + 1 :]
    kl = (lb.exp() * (lb - lc)).sum(-1)
    nll_b = -lb.gather(-1, targets[..., None]).squeeze(-1)
    assert rep.tokens == 3 * (ctx // 2 - 1)
    assert rep.kld.mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert rep.kld.max == pytest.approx(float(kl.max()), rel=1e-4)
    assert rep.ppl.baseline == pytest.approx(math.exp(float(nll_b.mean())), rel=1e-4)
    same = (lb.argmax(-1) == lc.argmax(-1)).float().mean()
    assert rep.top1_agreement == pytest.approx(float(same))


def test_too_little_text_and_missing_file_are_clear(pair, tmp_path):
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows([1, 2, 3], 16, 0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        compare(pair, pair, texts=[str(tmp_path / "missing.txt")], progress=False)


def test_different_tokenizers_are_refused(pair):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="tokenizers differ"):
        compare(pair, (pair[0], PreTrainedTokenizerFast(tokenizer_object=other)), progress=False)


def test_eval_cli_writes_the_documented_json_keys(tiny_models, tmp_path):
    art = quantship.quantize(str(tiny_models["llama"]), "w4g32", out=tmp_path / "q", progress=False,
                             log=lambda *a: None)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    assert cli(["eval", str(tiny_models["llama"]), str(art), "--text", str(text), "--ctx", "32",
                "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    for key in ("ppl.baseline", "ppl.candidate", "kld.mean", "kld.median", "kld.p90", "kld.p99", "kld.max",
                "top1_agreement", "delta_p.mean", "delta_p.rms", "tokens"):
        node = rep
        for part in key.split("."):
            node = node[part]
        assert isinstance(node, (int, float))
    assert rep["settings"]["ctx"] == 32
