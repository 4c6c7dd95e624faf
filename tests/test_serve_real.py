"""`quantship serve` on the default model's w8 artifact with real clients (slow: a minute or two on 2 cores)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import quantship  # noqa: E402
from conftest import real_model_available  # noqa: E402
from serve_helpers import LiveServer  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not real_model_available(), reason="run `quantship model pull smollm2-135m`")]


def test_openai_and_lm_eval_against_the_w8_artifact(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from quantship.engine import Engine, SamplingParams

    art = tmp_path / "w8"
    quantship.quantize("smollm2-135m", "w8", out=str(art), progress=False, log=lambda *a: None)
    with LiveServer({"baseline": str(art), "max_batch": 4}) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        prompt = "The capital of France is"
        r = c.completions.create(model="w8", prompt=prompt, max_tokens=16, temperature=0, logprobs=0,
                                 extra_body={"ignore_eos": True})
        chat = c.chat.completions.create(model="w8", messages=[{"role": "user", "content": "Name a color."}],
                                         max_tokens=12, temperature=0)
        items = [("The quick brown fox jumps over the", " lazy dog"), ("Paris is the capital of", " France")]
        lm = LocalCompletionsAPI(base_url=s.url + "/v1/completions", model="w8", tokenizer=str(art),
                                 tokenizer_backend="huggingface", max_retries=1)
        served = lm.loglikelihood([Instance("loglikelihood", {}, it, i) for i, it in enumerate(items)],
                                  disable_tqdm=True)
    model, tok = quantship.load(art)
    expected = Engine(model, tok, max_batch=1).generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert r.choices[0].logprobs.tokens == [tok.decode([t], clean_up_tokenization_spaces=False) for t in expected]
    assert chat.choices[0].message.content and chat.usage.completion_tokens >= 1
    ref_model, _ = quantship.load(art)
    for (ctx, cont), (ll, _) in zip(items, served):
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(ref_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert ll == pytest.approx(sum(float(logp[p - 1, ids[p]]) for p in range(len(c_ids), len(ids))), abs=1e-3)
