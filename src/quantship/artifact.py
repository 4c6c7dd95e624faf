"""Artifact folders: write (atomically), verify (schema + sha256), load (verified, mmap).

Layout:
    config.json, tokenizer files       as Hugging Face writes them
    model.safetensors                  float tensors + per QuantLinear: .qweight .scales [.offsets] [.bias]
    quantship.json                     the manifest (schema_version, source, scheme, method, modules, bpw,
                                       calibration, environment, timings, files: sha256 of every other file)
The manifest's `content_sha256` digests the sorted (path, sha256) list of the other files, so the
same inputs and seed give the same content hash; only timings/created differ between runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from .formats.linear import QuantLinear
from .formats.scheme import parse_scheme
from .fsutil import atomic_dir, atomic_write_json, hash_tree, sha256_bytes, sha256_file
from .models.builtin import SOURCE_MANIFEST

MANIFEST = "quantship.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "source", "scheme", "method", "modules", "bits_per_weight", "files",
                 "content_sha256", "environment")


class ArtifactError(ValueError):
    """The artifact is missing, malformed or tampered with."""


def write_artifact(result, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a QuantResult to `out` atomically; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    started = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        state = _dedup_state(result.model)
        # one metadata key only: safetensors writes metadata from a hash map, in no fixed order
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        result.model.config.save_pretrained(tmp)
        result.tokenizer.save_pretrained(tmp)
        files = hash_tree(tmp)
        manifest = _manifest(result, files, write_s=time.perf_counter() - started)
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


def content_hash(files: dict[str, str]) -> str:
    return sha256_bytes("".join(f"{path}\0{digest}\n" for path, digest in sorted(files.items())).encode())


def _dedup_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are stored once and re-tied on load
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    return state


def _manifest(result, files: dict[str, str], write_s: float) -> dict:
    modules = result.modules
    q_bits = sum(m["bits_per_weight"] * m["shape"][0] * m["shape"][1] for m in modules.values())
    q_weights = sum(m["shape"][0] * m["shape"][1] for m in modules.values())
    model_bytes = sum(t.numel() * t.element_size() for t in _dedup_state(result.model).values())
    total_params = sum(p.numel() for p in _unique_params(result.model)) + q_weights
    return {
        "schema_version": SCHEMA_VERSION,
        "quantship_version": _version(),
        "source": _source_info(result.source),
        "scheme": result.spec.scheme,  # the default; each module's own is in "modules"
        "overrides": [[pattern, scheme] for pattern, scheme in result.spec.overrides],  # (regex, scheme), last wins
        "method": {"name": result.spec.method, "params": result.method_params},
        "targets": {"ignore": list(result.spec.ignore), "quantize_head": result.spec.quantize_head},
        "seed": result.spec.seed,
        "modules": modules,
        "bits_per_weight": {
            "quantized_layers": round(q_bits / q_weights, 4) if q_weights else None,
            "whole_model": round(model_bytes * 8 / total_params, 4),
        },
        "model_bytes": model_bytes,
        "tied": _tied_keys(result.model),
        "calibration": result.calibration,
        "method_report": result.extra or None,
        "environment": environment(),
        "timings": {**result.timings, "write_s": round(write_s, 3)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "content_sha256": content_hash(files),
    }


def _unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            yield p


def _tied_keys(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    tied = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in first:
            tied[key] = first[tensor.data_ptr()]
        else:
            first[tensor.data_ptr()] = key
    return tied


def _source_info(source: Path) -> dict:
    source = Path(source)
    manifest = source / SOURCE_MANIFEST
    if manifest.is_file():  # a built-in: its hashes were recorded at pull time
        info = json.loads(manifest.read_text())
        return {"name": info["name"], "path": str(source), "files": info["files"], "gguf": info.get("gguf")}
    files = {p.name: sha256_file(p) for p in sorted(source.iterdir()) if p.is_file()}
    return {"name": source.name, "path": str(source), "files": files}


def environment() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "quantship": _version(),
        "git_commit": _git_commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
    }


def _version() -> str:
    from . import __version__

    return __version__


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder; expected a quantship artifact folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}; it is not a quantship artifact (run `quantship quantize`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({e}); the artifact is damaged") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} must hold a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks required key(s): {', '.join(missing)}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path} has schema_version {manifest['schema_version']!r}; this quantship reads "
            f"version {SCHEMA_VERSION}. Re-quantize with this version or upgrade quantship."
        )
    return manifest


def verify_artifact(path: str | Path) -> dict:
    """Check schema and every file's sha256. Raises ArtifactError naming the first bad file(s)."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    listed = manifest["files"]
    for rel, digest in sorted(listed.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{rel}: sha256 mismatch (the file was changed after it was written)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: not listed in {MANIFEST}")
    if content_hash(listed) != manifest["content_sha256"]:
        problems.append(f"{MANIFEST}: content_sha256 does not match its file list (the manifest was edited)")
    if problems:
        raise ArtifactError(f"artifact {path} failed verification:\n  " + "\n  ".join(problems))
    return manifest


def load_artifact(path: str | Path, *, dtype: torch.dtype = torch.float32, verify: bool = True):
    """-> (model, tokenizer). Verifies hashes first and refuses a tampered artifact."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from accelerate import init_empty_weights

    path = Path(path)
    manifest = verify_artifact(path) if verify else read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    # The skeleton's parameters live on the meta device: every weight comes from the mmap'd file, and
    # allocating (then freeing) a float skeleton leaves its pages resident in the heap. Buffers stay
    # real so that the ones computed at init (rotary inv_freq) are correct.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, info in manifest["modules"].items():
        out_f, in_f = info["shape"]
        with torch.device("meta"):
            layer = QuantLinear(in_f, out_f, parse_scheme(info["scheme"]), bias=info["bias"], dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = load_file(str(path / "model.safetensors"))  # mmap-backed
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(manifest.get("tied", {}))
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"artifact {path}: tensors do not match the model built from its config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})"
        )
    if tied:
        model.tie_weights()
    unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise ArtifactError(f"artifact {path}: no tensor in model.safetensors for {unloaded[:5]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
