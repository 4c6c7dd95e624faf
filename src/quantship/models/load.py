"""Resolve "a model" (built-in name, HF folder, quantship artifact) and load it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .arch import arch_facts
from .builtin import BUILTINS, pull

ARTIFACT_MANIFEST = "quantship.json"


def resolve_model(name_or_path: str | Path, *, log=print) -> Path:
    """A built-in name (pulled on first use) or a local folder with config.json -> the folder."""
    text = str(name_or_path)
    if text in BUILTINS:
        return pull(text, log=log)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {text!r} is neither a built-in name ({', '.join(sorted(BUILTINS))}) nor an existing path"
        )
    if not path.is_dir():
        raise NotADirectoryError(f"model path {path} is a file; expected a Hugging Face model folder with config.json")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; expected a Hugging Face model folder "
            f"(config.json, *.safetensors, tokenizer files) or a quantship artifact"
        )
    model_type = read_config(path).get("model_type")
    arch_facts(str(model_type))  # raises a clear error for unknown architectures
    return path


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from e


def is_artifact(path: Path) -> bool:
    return (path / ARTIFACT_MANIFEST).is_file()


def load_model(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, log=print):
    """-> (model, tokenizer). Quantship artifacts are verified and loaded with QuantLinear layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, log=log)
    if is_artifact(path):
        from ..artifact import load_artifact

        return load_artifact(path, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
