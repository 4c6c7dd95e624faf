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


def context_length(config: dict) -> int | None:
    """The model's maximum context in tokens, from its config (None when the config does not say)."""
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_context(name_or_path: str | Path, ctx: int, *, log=print) -> None:
    """Refuse a window longer than the model's context, before any weights are loaded."""
    path = resolve_model(name_or_path, log=log)
    limit = context_length(read_config(path))
    if limit is not None and ctx > limit:
        raise ValueError(f"--ctx {ctx} exceeds the context of {name_or_path} ({limit} tokens, "
                         f"max_position_embeddings in its config.json); choose --ctx <= {limit}")


def is_artifact(path: Path) -> bool:
    return (path / ARTIFACT_MANIFEST).is_file()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files, each header checked; a clear error for anything else.

    Only safetensors are loaded: a pickle checkpoint can run arbitrary code when unpickled."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path / pickles[0]} is a pickle checkpoint; quantship loads only safetensors (unpickling can run "
                f"arbitrary code). Convert it once where you trust it: AutoModelForCausalLM.from_pretrained(folder)"
                f".save_pretrained(new_folder, safe_serialization=True)"
            )
        raise FileNotFoundError(f"{path} has no *.safetensors weights; expected a Hugging Face model folder "
                                f"(config.json, model.safetensors or shards, tokenizer files)")
    for file in files:
        safetensors_header(file)
    return files


def safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in `file`, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError (and OSError) on damaged files
        text = str(e).strip().splitlines()
        raise ValueError(f"{file} is not a readable safetensors file ({text[0] if text else type(e).__name__}); "
                         f"it may be truncated or damaged: copy or convert it again") from None


def float32_bytes(path: Path) -> int:
    """Bytes of the folder's tensors held as float32 (what quantization loads), from the headers."""
    import math

    total = 0
    for file in weight_files(path):
        total += sum(math.prod(shape) * 4 for _, shape in safetensors_header(file).values())
    return total


def check_finite_state(model: torch.nn.Module, where: Path) -> None:
    from ..artifact import check_finite

    check_finite(dict(model.state_dict()), what=f"model {where} cannot be used")


def load_model(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, log=print,
               public_key: str | Path | None = None):
    """-> (model, tokenizer). Quantship artifacts are verified and loaded with QuantLinear layers;
    with `public_key` only an artifact signed by that key is accepted (quantship sign).

    A Hugging Face folder is loaded from safetensors only, and refused (naming the tensors) if any
    weight is NaN or Inf: quantizing such a model would write non-finite scales."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, log=log)
    if is_artifact(path):
        from ..artifact import load_artifact

        return load_artifact(path, dtype=dtype, public_key=public_key)
    if public_key is not None:
        raise ValueError(f"{path} is not a quantship artifact, so it carries no quantship signature; a required "
                         f"signature accepts only signed artifacts (quantship sign ARTIFACT --key KEY.priv)")
    weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        text = str(e).strip().splitlines()
        raise ValueError(f"model {path} cannot be loaded: {text[0] if text else type(e).__name__}") from None
    model.eval()
    check_finite_state(model, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        text = str(e).strip().splitlines()
        raise ValueError(f"model {path}: the tokenizer cannot be loaded ({text[0] if text else type(e).__name__}); "
                         f"expected tokenizer.json or tokenizer_config.json beside config.json") from None
    return model, tokenizer
