"""Engine: token-for-token equality with transformers, batching invariance, stops, KV int8."""

from __future__ import annotations

import pytest
import torch

import quantship
from quantship.engine import Engine, SamplingParams
from quantship.formats.linear import QuantLinear

from conftest import build_tiny_model

PROMPTS = ["The quick brown fox", "def add(a, b):", "Quantization maps real numbers", "Perplexity"]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def hf_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny(request):
    return build_tiny_model(request.param, seed=3)


def test_greedy_output_equals_transformers(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4, fast=False)
    outs = engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out == hf_greedy(model, tok, prompt, GREEDY.max_tokens)


def test_batching_does_not_change_a_requests_output(tiny):
    model, tok = tiny
    alone = [Engine(model, tok, max_batch=1, fast=False).generate([p], GREEDY)[0] for p in PROMPTS]
    together = Engine(model, tok, max_batch=4, fast=False).generate(PROMPTS, GREEDY)
    assert together == alone
    # joining mid-flight: requests with different lengths finish at different steps and slots compact
    engine = Engine(model, tok, max_batch=2, fast=False)
    lengths = [3, 10, 6, 8]
    staggered = engine.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
    assert staggered == [a[:n] for a, n in zip(alone, lengths)]


def test_qwen3_qk_norm_family_matches():
    model, tok = build_tiny_model("qwen3")
    out = Engine(model, tok, fast=False).generate([PROMPTS[0]], GREEDY)[0]
    assert out == hf_greedy(model, tok, PROMPTS[0], GREEDY.max_tokens)


def test_max_tokens_and_stop_strings_and_eos():
    model, tok = build_tiny_model("qwen2", seed=3)
    engine = Engine(model, tok, fast=False)
    events = list(engine.stream(PROMPTS[0], SamplingParams(max_tokens=7, ignore_eos=True)))
    assert len(events) == 7 and events[-1].finish_reason == "length" and events[-1].finished
    full = "".join(e.text for e in events)
    stop = full[3:5]
    cut = list(engine.stream(PROMPTS[0], SamplingParams(max_tokens=7, stop=(stop,), ignore_eos=True)))
    text = "".join(e.text for e in cut)
    assert cut[-1].finish_reason == "stop" and stop not in text and full.startswith(text)
    first = events[0].token_id
    ended = list(engine.stream(PROMPTS[0], SamplingParams(max_tokens=7, stop_token_ids=(first,))))
    assert len(ended) == 1 and ended[0].finish_reason == "stop"


def test_a_request_longer_than_the_context_is_refused():
    model, tok = build_tiny_model("llama")
    engine = Engine(model, tok, max_seq_len=32, fast=False)
    with pytest.raises(ValueError, match="more than the context of 32"):
        engine.add_request(list(range(30)), SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="unsupported|no forward"):
        Engine(*build_tiny_model("gpt2"))


def test_sampling_is_seeded_and_respects_top_k():
    model, tok = build_tiny_model("qwen2", seed=3)
    engine = Engine(model, tok, fast=False)
    p = SamplingParams(max_tokens=12, temperature=1.5, top_k=5, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate([PROMPTS[1]], p)[0], engine.generate([PROMPTS[1]], p)[0]
    assert a == b
    c = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.5, seed=8, ignore_eos=True))[0]
    assert c != a
    rep = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, repetition_penalty=5.0, ignore_eos=True))[0]
    assert len(set(rep)) > len(set(engine.generate([PROMPTS[1]], GREEDY)[0][:12])) - 1
    # top-k: every sampled token is among the k most likely next tokens of its prefix (by transformers'
    # own forward); a hot temperature makes sampling without the cut leave the top k (checked too)
    prompt = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]

    def ranks(out: list[int]) -> list[int]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]  # (T, V)
        return [int((row > row[t]).sum()) for row, t in zip(logits, out)]  # 0 = the most likely

    hot = dict(max_tokens=24, temperature=5.0, seed=11, ignore_eos=True)
    assert max(ranks(engine.generate([prompt], SamplingParams(top_k=3, **hot))[0])) < 3
    assert max(ranks(engine.generate([prompt], SamplingParams(**hot))[0])) >= 3


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_scaled_kv_cache_halves_memory_and_stays_close(kind):
    model, tok = build_tiny_model("llama", seed=3)
    f32 = Engine(model, tok, fast=False, max_seq_len=128)
    q8 = Engine(model, tok, fast=False, max_seq_len=128, kv_cache=kind)
    bf16 = Engine(model, tok, fast=False, max_seq_len=128, kv_cache="bfloat16")
    assert bf16.kv_bytes_per_token() == f32.kv_bytes_per_token() // 2
    assert q8.kv_bytes_per_token() < 0.6 * bf16.kv_bytes_per_token()
    long_prompt = list(range(2, 90))
    for e in (f32, q8):
        e.add_request(long_prompt, SamplingParams(max_tokens=1))
        e.step()
    # logits of the next position through each cache: compare distributions
    ids, pos = torch.tensor([5]), torch.tensor([len(long_prompt)])
    for e in (f32, q8):
        e.running = [type("R", (), {"length": len(long_prompt)})()]
    lf = torch.log_softmax(f32.forward.decode(ids, pos, f32.cache), -1)
    lq = torch.log_softmax(q8.forward.decode(ids, pos, q8.cache), -1)
    kld = float((lf.exp() * (lf - lq)).sum())
    assert not torch.equal(lf, lq)  # the cache really is quantized...
    assert kld < {"int8": 1e-3, "fp8": 1e-2}[kind]  # ...and the next-token distribution barely moves


def test_scaled_kv_cache_round_trip_error_is_bounded():
    from quantship.engine.kv_cache import KVCache

    x = torch.randn(2, 3, 5, 16) * torch.logspace(-2, 2, 16)  # heads with very different ranges
    for kind, rel in (("int8", 1 / 127), ("fp8", 1 / 16)):
        cache = KVCache(1, 2, 3, 8, 16, kind)
        cache.write(0, torch.tensor([0, 1]), torch.tensor([0, 0]), x, x)
        k, _ = cache.read(0, 2, 5, torch.float32)
        bound = x.abs().amax(-1, keepdim=True) * rel  # relative to each (head, position)'s absmax
        assert ((k - x).abs() <= bound + 1e-6).all(), kind


def test_unknown_kv_cache_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: float32, bfloat16, int8, fp8"):
        from quantship.engine.kv_cache import KVCache
        KVCache(1, 1, 1, 4, 4, "int4")


def test_quantized_fast_path_matches_its_reference(tiny_models):
    r = quantship.quantize(str(tiny_models["llama"]), "w4g32", progress=False, log=lambda *a: None)
    ref = Engine(r.model, r.tokenizer, fast=False).forward
    ids = torch.tensor(r.tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"])
    exact = ref.prefill(ids, Engine(r.model, r.tokenizer, fast=False).cache, 0)
    fast_engine = Engine(r.model, r.tokenizer, fast=True)
    assert fast_engine.kernels.get("int4_native", 0) + fast_engine.kernels.get("int4_group", 0) > 0
    fast = fast_engine.forward.prefill(ids, fast_engine.cache, 0)
    lp_e, lp_f = torch.log_softmax(exact, -1), torch.log_softmax(fast, -1)
    assert float((lp_e.exp() * (lp_e - lp_f)).sum()) < 1e-2


def test_a_wrapped_linear_still_works():
    model, tok = build_tiny_model("llama", seed=3)
    expected = Engine(model, tok, fast=False).generate([PROMPTS[0]], GREEDY)[0]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    for layer in model.model.layers:
        layer.mlp.down_proj = Wrapper(layer.mlp.down_proj)
    assert Engine(model, tok, fast=False).generate([PROMPTS[0]], GREEDY)[0] == expected
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
