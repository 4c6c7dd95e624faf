"""Shared fixtures: tiny random-init models of several architectures, saved as HF folders.

There is no model hub here, so the tokenizer is built offline: a byte-level BPE trained on a
few sentences with the `tokenizers` library.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Quantization maps real numbers onto a small grid of levels.",
    "Perplexity and KL divergence measure how much a model changed.",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")


def make_config(arch: str, vocab_size: int):
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    common = dict(vocab_size=vocab_size, eos_token_id=0, pad_token_id=1, bos_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "qwen3":  # RMSNorm over head_dim on q and k before rope
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if arch == "phi3":  # fused qkv_proj / gate_up_proj; registers o_proj before qkv_proj
        return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gemma3":  # (1 + weight) norms, a pre-feedforward norm, sliding and global layers
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=16,
                                **common)
    raise ValueError(arch)


def build_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tokenizer)), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def save_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    model, tokenizer = build_tiny_model(arch, seed)
    path.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[key] = tensor.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    archs = ("llama", "qwen2", "gpt2", "opt", "mistral", "phi3", "gemma3")
    return {arch: save_tiny_model(arch, root / arch) for arch in archs}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # Built-in models keep their real cache (slow tests use it); everything else writes under tmp.
    monkeypatch.chdir(tmp_path)


def real_model_available() -> bool:
    from quantship.models.builtin import is_pulled

    return is_pulled("smollm2-135m")
