"""Memory planner: parameter counts equal real models, hand-computed bytes, budgets, errors."""

from __future__ import annotations

import json

import pytest

from quantship.bench.plan import (GPU_PRESETS, activation_bytes, cost_per_million_tokens, example_names,
                                  kv_bytes_per_token, param_counts, parse_memory, plan, render_plan,
                                  shape_from_config, weight_bytes)

SMALL = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": False}


def test_small_config_by_hand():
    p = param_counts(shape_from_config(SMALL))
    # head_dim 32, kv width 2*32 = 64; attention per layer q 256x256 + k,v 64x256 + o 256x256
    assert p["attention"] == 4 * (256 * 256 * 2 + 64 * 256 * 2)
    assert p["mlp"] == 4 * 3 * 256 * 512
    assert p["norms"] == 4 * 2 * 256 + 256
    assert p["embeddings"] == p["lm_head"] == 1000 * 256
    # KV per token in bf16: 4 layers x 2 kv heads x 32 x 2 (K,V) x 2 bytes
    assert kv_bytes_per_token(shape_from_config(SMALL), "bf16") == 4 * 2 * 32 * 2 * 2 == 1024
    # int8 adds an fp32 scale per token per head for K and for V
    assert kv_bytes_per_token(shape_from_config(SMALL), "int8") == 4 * 2 * (32 + 4) * 2 == 576


def test_small_config_w4g128_bytes_by_hand():
    w = weight_bytes(shape_from_config(SMALL), "w4g128")
    # 4-bit codes + one fp16 scale per 128 inputs = 4.125 bits per weight
    assert w["attention"] == 4 * (256 * 256 * 2 + 64 * 256 * 2) * 4.125 / 8
    assert w["mlp"] == 4 * 3 * 256 * 512 * 4.125 / 8
    assert w["embeddings"] == w["lm_head"] == 1000 * 256 * 2  # source bf16
    wq = weight_bytes(shape_from_config(SMALL), "w4g128", quantize_head=True)
    assert wq["lm_head"] == 1000 * 256 * 4.125 / 8


def test_llama2_7b_published_numbers():
    p = plan("llama-2-7b", "fp16", kv="fp16", ctx=4096, memory="h100-80gb")
    assert p.total_params == 6_738_415_616  # "6.74B"
    assert p.total_weight_bytes == 2 * 6_738_415_616  # ≈ 13.5 GB
    assert abs(p.total_weight_bytes / 1e9 - 13.48) < 0.01
    assert p.kv_bytes_per_token == 32 * 32 * 128 * 2 * 2 == 524288
    # 80 GB: (81559 MiB * 0.9 - 13.5 GB - prefill activations) / (4096 * 512 KiB + logits) = 29 sequences
    usable = GPU_PRESETS["h100-80gb"] - int(GPU_PRESETS["h100-80gb"] * 0.1)
    act = activation_bytes(p.shape, prefill_tokens=4096, batch=0, act_bytes=2)
    assert p.max_batch == (usable - p.total_weight_bytes - act) // (4096 * 524288 + 32000 * 4) == 29


@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496),
                                         ("mistral-7b", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512)])
def test_example_configs_match_published_parameter_counts(name, params):
    assert plan(name, "bf16").total_params == params


def test_examples_shipped():
    assert {"llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b"} <= set(example_names())


def test_kv_int8_doubles_batch_and_quantization_shrinks_weights():
    bf16 = plan("llama-3.1-8b", "w4g128", kv="bf16", memory="24GiB")
    int8 = plan("llama-3.1-8b", "w4g128", kv="int8", memory="24GiB")
    assert int8.kv_bytes_per_token == 32 * 8 * (128 + 4) * 2
    assert 1.8 < int8.max_batch / bf16.max_batch < 2.0
    assert plan("llama-3.1-8b", "w8").total_weight_bytes < plan("llama-3.1-8b", "bf16").total_weight_bytes
    assert not plan("llama-3.1-70b", "bf16", memory="h100-80gb").fits


def test_parameter_counts_equal_real_models():
    torch = pytest.importorskip("torch")
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    configs = [
        LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False, **common),
        LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common),
        Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common),
        Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=32, **common),
        Phi3Config(intermediate_size=128, num_key_value_heads=2, pad_token_id=0, **common),
        Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2, head_dim=32, **common),
        GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=300, bos_token_id=0, eos_token_id=0),
        OPTConfig(ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=32, **common),
    ]
    for cfg in configs:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        actual = sum(p.numel() for p in model.parameters())
        assert sum(param_counts(shape_from_config(cfg.to_dict())).values()) == actual, cfg.model_type


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("500MiB", 500 * 2**20),
                                           ("1.5 TB", 1_500_000_000_000), ("l4-24gb", 23034 * 2**20), (1024, 1024)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["24 gigs", "GiB", "-5GB", "0GB", ""])
def test_parse_memory_errors_name_the_format(bad):
    with pytest.raises(ValueError, match="unit|positive"):
        parse_memory(bad)


def test_bad_scheme_lists_grammar_and_floats():
    with pytest.raises(ValueError, match=r"grammar.*fp32, bf16, fp16"):
        plan("llama-2-7b", "int4")
    with pytest.raises(ValueError, match="does not divide"):
        plan({**SMALL, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}, "w4g128")
    with pytest.raises(ValueError, match="KV cache type"):
        plan("llama-2-7b", "w8", kv="int3")


def test_unknown_model_and_missing_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="example"):
        plan("no-such-model", "w8")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mystery", "vocab_size": 10}))
    with pytest.raises(ValueError, match="hidden_size"):
        plan(tmp_path, "w8")


def test_unknown_model_type_is_refused_naming_the_architecture_table():
    with pytest.raises(ValueError, match=r"no architecture facts for model_type 'mystery'.*gemma3.*ARCHITECTURES"):
        shape_from_config({**SMALL, "model_type": "mystery"})


def test_cost_per_million_tokens():
    assert cost_per_million_tokens(1000.0, 3.6) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cost_per_million_tokens(0, 1.0)


def test_render_and_cli(capsys):
    from rich.console import Console

    from quantship.cli import main

    console = Console(width=120, record=True)
    console.print(render_plan(plan("mistral-7b", "w4g128", kv="int8", memory="24GiB")))
    assert "max batch" in console.export_text()
    assert main(["plan", "llama-2-7b", "--scheme", "fp16", "--kv", "fp16", "--gpu", "h100-80gb",
                 "--tok-s", "1000", "--price-per-hour", "3.6"]) == 0
    out = capsys.readouterr().out
    assert "6.738 B" in out and "$1.000 per 1M tokens" in out
    assert main(["plan", "llama-2-7b", "--scheme", "int4"]) == 1
