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


def _tiny_gemma3(**overrides):
    """Gemma 3 with what sets it apart exercised: sliding (window 4) and global layers with their own rope
    bases, (1 + w) norms with non-zero w, q/k norms, query_pre_attn_scalar != head_dim, GELU-tanh."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from conftest import make_tokenizer

    tok = make_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                           max_position_embeddings=256, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                            "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                           eos_token_id=0, pad_token_id=1, bos_token_id=0, **overrides)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # transformers initialises Gemma's norms to w = 0 (a scale of 1 + w = 1)
                p.copy_(torch.randn_like(p) * 0.5)
    return model.eval(), tok


def _engine_logits_along(engine, seqs: list[torch.Tensor], prompt_len: list[int]) -> list[torch.Tensor]:
    """Prefill each seq[:prompt_len] into its own slot, then decode the rest of all seqs together, one
    position per step -> per seq the logits (len - prompt_len + 1, V) of positions prompt_len-1 .. len-1."""
    out = [[engine.forward.prefill(s[:n], engine.cache, slot)] for slot, (s, n) in enumerate(zip(seqs, prompt_len))]
    positions = torch.tensor(prompt_len)
    while True:
        live = [i for i, s in enumerate(seqs) if positions[i] < len(s)]
        if not live:
            return [torch.stack(o) for o in out]
        assert live == list(range(len(live)))  # decode reads slots 0..n-1: longer sequences come first
        ids = torch.stack([seqs[i][positions[i]] for i in live])
        logits = engine.forward.decode(ids, positions[:len(live)], engine.cache)
        for i in live:
            out[i].append(logits[i])
        positions[:len(live)] += 1


@pytest.mark.parametrize("softcap", [False, True])
def test_gemma3_logits_equal_transformers(softcap):
    # final-logit softcapping; transformers' Gemma 3 attention does not read attn_logit_softcapping
    extra = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0) if softcap else {}
    model, tok = _tiny_gemma3(**extra)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, len(tok), (n,), generator=g) for n in (17, 11)]  # both longer than the window
    engine = Engine(model, tok, max_batch=2, fast=False)
    got = _engine_logits_along(engine, seqs, [9, 3])
    for seq, n, logits in zip(seqs, [9, 3], got):
        with torch.no_grad():
            ref = model(seq.unsqueeze(0)).logits[0, n - 1:].float()
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)
    # the window matters here: without it the sliding layers would see older keys and the logits would move
    with torch.no_grad():
        full = model(seqs[0].unsqueeze(0), attention_mask=torch.ones(1, 17)).logits[0, -1]
    assert torch.equal(full.argmax(), got[0][-1].argmax())


def test_gemma3_greedy_equals_transformers_generate_and_runs_past_its_window():
    model, tok = _tiny_gemma3()
    engine = Engine(model, tok, max_batch=4, fast=False)
    assert engine.max_seq_len == 256  # sliding layers are masked: the context is not capped at the window
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out == hf_greedy(model, tok, prompt, params.max_tokens)


def test_gemma3_fast_engine_keeps_the_python_decode_and_says_why(tiny_models):
    r = quantship.quantize(str(tiny_models["gemma3"]), "w8", progress=False, log=lambda *a: None)
    reference = Engine(r.model, r.tokenizer, fast=False).generate(PROMPTS, GREEDY)
    fast = Engine(r.model, r.tokenizer)
    assert fast.decode_path == "python" and "gemma3" in fast.decode_note
    assert fast.kernels and sum(fast.kernels.values()) > 0 and fast.fused > 0
    assert fast.generate(PROMPTS, GREEDY) == reference


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
    runs = "gemma3, gemma3_text, llama, mistral, qwen2, qwen3 \\(use"
    with pytest.raises(ValueError, match=f"no forward for model_type 'gpt2'.*{runs}"):
        Engine(*build_tiny_model("gpt2"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "gpt2", "opt"])
def test_the_engine_runs_exactly_the_table_entries_with_engine_facts(arch):
    from quantship.engine.forward import DecoderForward
    from quantship.models.arch import arch_facts

    model, _ = build_tiny_model(arch)
    facts = arch_facts(model.config.model_type)
    if facts.engine is None:
        with pytest.raises(ValueError, match="no engine facts"):
            DecoderForward(model)
        return
    f = DecoderForward(model)
    block = model.get_submodule(facts.blocks)[0]
    attn, mlp = facts.branches
    # the modules it calls are the ones the quantizer's groups and branches name
    b = f.blocks[0]
    assert [b.q, b.k, b.v] == [block.get_submodule(n) for n in facts.fed_by(attn.pre_norm)]
    assert b.down is block.get_submodule(mlp.tail) and b.mlp_norm is block.get_submodule(mlp.pre_norm)
    assert (b.q_norm is not None) == (facts.qk_norm is not None) == (arch in ("qwen3", "gemma3"))
    assert (b.mlp_post_norm is not None) == (arch == "gemma3")


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
