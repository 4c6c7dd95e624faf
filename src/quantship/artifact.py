"""Artifact folders: write (atomically), verify (schema + sha256), load (verified, mmap).

Layout:
    config.json, tokenizer files       as Hugging Face writes them
    model.safetensors                  float tensors + per QuantLinear: .qweight .scales [.offsets] [.bias]
    quantship.json                     the manifest (schema_version, source, scheme, method, modules, bpw,
                                       calibration, environment, timings, files: sha256 of every other file)
The manifest's `content_sha256` digests the sorted (path, sha256) list of the other files, so the
same inputs and seed give the same content hash; only timings/created differ between runs.
`manifest_sha256` digests the manifest itself (its canonical JSON without that field), so every
byte that decides what the model computes is covered by a digest that verify and load check.
"""

from __future__ import annotations

import json
import os
import re
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from .formats.linear import QuantLinear
from .formats.scheme import parse_scheme
from .fsutil import atomic_dir, atomic_write_json, canonical_json, hash_tree, sha256_bytes, sha256_file
from .models.builtin import SOURCE_MANIFEST
from .signing import SIGNATURE  # quantship sign's signature file: beside the listed files, covers them all

MANIFEST = "quantship.json"
SCHEMA_VERSION = 2
REQUIRED_KEYS = ("schema_version", "source", "scheme", "method", "modules", "bits_per_weight", "files",
                 "content_sha256", "manifest_sha256", "environment")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(ValueError):
    """The artifact is missing, malformed or tampered with."""


def write_artifact(result, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a QuantResult to `out` atomically; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    started = time.perf_counter()
    if overwrite:
        check_replaceable(out, source=result.source)
    state = _dedup_state(result.model)
    check_finite(state, what="refusing to write the artifact")
    with atomic_dir(out, overwrite=overwrite) as tmp:
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


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_bytes(canonical_json(body).encode())


def check_finite(tensors: dict[str, torch.Tensor], *, what: str) -> None:
    """Raise naming every floating tensor that holds NaN or Inf, with its count."""
    bad = []
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{what}: non-finite values (NaN/Inf) in {', '.join(bad[:5])}{more}")


def check_replaceable(target: str | Path, *, source: str | Path | None = None) -> None:
    """`--force` may replace only a quantship artifact that holds nothing else, never the source model.

    An empty folder may always be used. Raises FileExistsError saying why the folder is refused."""
    check_replaceable_folder(target, source=source, what="artifact", source_what="model being quantized",
                             manifest_name=MANIFEST, listed_files=lambda t: read_manifest(t)["files"],
                             errors=(ArtifactError,))


def check_replaceable_folder(target: str | Path, *, source, what: str, source_what: str, manifest_name: str,
                             listed_files, errors: tuple[type[Exception], ...]) -> None:
    """The rule for every folder quantship writes (artifacts, exports): replace it only if it is one of
    ours (a valid manifest) holding nothing but its listed files (and a signature), never `source`."""
    target = Path(target).expanduser()
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a quantship {what} folder; --force replaces only such "
                              f"folders. Choose another output or remove the file yourself")
    if source is not None:
        src, tgt = Path(source).resolve(), target.resolve()
        if src == tgt or tgt in src.parents:
            raise FileExistsError(f"{target} is (or contains) the source {source_what.split()[0]} {source}; "
                                  f"--force never replaces "
                                  f"the {source_what}. Choose another output folder")
    if not any(target.iterdir()):
        return
    refuse = "--force replaces only folders quantship wrote. Choose another output or move the folder yourself"
    if not (target / manifest_name).is_file():
        raise FileExistsError(f"{target} is not a quantship {what} (it has no {manifest_name}); {refuse}")
    try:
        listed = set(listed_files(target))
    except errors as e:
        raise FileExistsError(f"{target} is not a valid quantship {what} ({e}); {refuse}") from None
    present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    foreign = sorted(present - listed - {manifest_name, SIGNATURE})
    if foreign:
        raise FileExistsError(f"{target} holds files quantship did not write ({', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); --force will not delete them. "
                              f"Move them or choose another output folder")


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
    manifest = {
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
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest


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
    """Parse and structurally check the manifest (no hashing: that is verify_artifact)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder; expected a quantship artifact folder")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}; it is not a quantship artifact (run `quantship quantize`)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({e}); the artifact is damaged") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} must hold a JSON object; the artifact is damaged")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks required key(s): {', '.join(missing)}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path} has schema_version {manifest['schema_version']!r}; this quantship reads "
            f"version {SCHEMA_VERSION}. Re-quantize with this version or use the quantship that wrote it."
        )
    _check_structure(manifest, manifest_path)
    return manifest


def _check_structure(manifest: dict, where: Path) -> None:
    """Types and values of the fields that loading reads; each problem names the field."""
    def bad(field: str, why: str):
        raise ArtifactError(f"{where}: field {field} {why}; the artifact is damaged")

    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        bad("files", "must map file paths to sha256 digests")
    for rel, digest in files.items():
        parts = Path(rel).parts if isinstance(rel, str) else ()
        if not parts or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            bad("files", f"lists an invalid path {rel!r}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            bad(f"files[{rel!r}]", "is not a sha256 hex digest")
    for key in ("content_sha256", "manifest_sha256"):
        if not isinstance(manifest[key], str) or not _HEX64.match(manifest[key]):
            bad(key, "is not a sha256 hex digest")
    modules = manifest["modules"]
    if not isinstance(modules, dict):
        bad("modules", "must map module names to their format")
    for name, info in modules.items():
        field = f"modules[{name!r}]"
        if not isinstance(info, dict):
            bad(field, "must be an object")
        if not isinstance(info.get("scheme"), str):
            bad(f"{field}.scheme", "must be a scheme name")
        try:
            scheme = parse_scheme(info["scheme"])
        except ValueError as e:
            bad(f"{field}.scheme", f"is invalid ({e})")
        if info.get("format") != scheme.kind:
            bad(f"{field}.format", f"is {info.get('format')!r} but scheme {scheme.name} stores {scheme.kind!r}")
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
            bad(f"{field}.shape", "must be [out_features, in_features] (positive integers)")
        if not isinstance(info.get("bias"), bool):
            bad(f"{field}.bias", "must be true or false")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        bad("tied", "must map tensor names to tensor names")


def verify_artifact(path: str | Path) -> dict:
    """Check schema, the manifest's own digest and every file's sha256.

    Raises ArtifactError with one line naming every bad file or field."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = []
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        problems.append(f"{MANIFEST}: manifest_sha256 does not match the manifest (the manifest was edited)")
    listed = manifest["files"]
    for rel, digest in sorted(listed.items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{rel}: sha256 mismatch (the file was changed after it was written)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: not listed in {MANIFEST}")
    if content_hash(listed) != manifest["content_sha256"]:
        problems.append(f"{MANIFEST}: content_sha256 does not match its file list (the manifest was edited)")
    if problems:
        raise ArtifactError(f"artifact {path} failed verification: " + "; ".join(problems)
                            + ". Re-quantize or restore the artifact from a trusted copy")
    return manifest


def load_artifact(path: str | Path, *, dtype: torch.dtype = torch.float32, verify: bool = True,
                  public_key: str | Path | None = None):
    """-> (model, tokenizer). Verifies hashes first and refuses a tampered artifact; the manifest's
    module table is cross-checked against the model's config and the stored tensors' shapes and
    dtypes before any tensor is used. With `public_key`, the artifact must also carry a valid
    signature by that key (quantship sign), else ArtifactError."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from accelerate import init_empty_weights

    path = Path(path)
    manifest = verify_artifact(path) if verify or public_key else read_manifest(path)
    if public_key is not None:
        from .signing import SignatureError, verify_signature

        try:
            verify_signature(path, public_key)
        except SignatureError as e:
            raise ArtifactError(f"refusing {path} (a signature is required): {e}") from None
    weights = path / "model.safetensors"
    header = _tensor_header(weights)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path}: config.json cannot be read ({_first_line(e)})") from None
    # The skeleton's parameters live on the meta device: every weight comes from the mmap'd file, and
    # allocating (then freeing) a float skeleton leaves its pages resident in the heap. Buffers stay
    # real so that the ones computed at init (rotary inv_freq) are correct.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, info in manifest["modules"].items():
        _check_module(model, name, info, header, path)
        out_f, in_f = info["shape"]
        with torch.device("meta"):
            layer = QuantLinear(in_f, out_f, parse_scheme(info["scheme"]), bias=info["bias"], dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = load_file(str(weights))  # mmap-backed
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches between the stored tensors and the config
        raise ArtifactError(f"artifact {path}: tensors do not fit the model built from config.json "
                            f"({_first_line(e)})") from None
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"artifact {path}: the tokenizer cannot be loaded ({_first_line(e)})") from None
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tensor_header(weights: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors header, without reading any tensor."""
    from .models.load import safetensors_header

    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing; the artifact is incomplete")
    try:
        return safetensors_header(weights)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


_STORED_DTYPE = {"int": "F16", "nf4": "F16", "fp8": "F32"}


def _check_module(model: nn.Module, name: str, info: dict, header: dict, path: Path) -> None:
    """The manifest's entry for `name` must fit the config's layer and the stored tensors exactly."""
    from .formats.pack import packed_row_bytes
    from .models.arch import arch_facts
    from .pipeline import linear_weight

    def fail(why: str):
        raise ArtifactError(f"artifact {path}: manifest module {name!r} {why}; the artifact is damaged")

    try:
        original = model.get_submodule(name)
    except AttributeError:
        fail("is not a layer of the model built from config.json")
    if not isinstance(original, (nn.Linear, *arch_facts(model.config.model_type).linear_types())):
        fail(f"is a {type(original).__name__}, not a linear layer")
    out_f, in_f = info["shape"]
    if tuple(linear_weight(original).shape) != (out_f, in_f):
        fail(f"has shape {[out_f, in_f]} but the config's layer is {list(linear_weight(original).shape)}")
    scheme = parse_scheme(info["scheme"])
    if scheme.granularity == "group" and in_f % scheme.group_size:
        fail(f"has group size {scheme.group_size}, which does not divide in_features={in_f}")
    n_scales = scheme.scale_count(out_f, in_f)
    scale_shape = (1, 1) if scheme.granularity == "tensor" else (out_f, n_scales // out_f)
    expected = {f"{name}.qweight": ("U8", (out_f, packed_row_bytes(in_f, scheme.bits))),
                f"{name}.scales": (_STORED_DTYPE[scheme.kind], scale_shape)}
    if not scheme.symmetric:
        expected[f"{name}.offsets"] = ("F16", scale_shape)
    for key, (dt, shape) in expected.items():
        if key not in header:
            fail(f"needs tensor {key}, which model.safetensors does not hold")
        if header[key] != (dt, shape):
            fail(f"({scheme.name}, shape {[out_f, in_f]}) needs {key} as {dt} {list(shape)}, "
                 f"stored {header[key][0]} {list(header[key][1])}")
    if scheme.symmetric and f"{name}.offsets" in header:
        fail(f"is symmetric ({scheme.name}) but model.safetensors holds {name}.offsets")
    if info["bias"] != (f"{name}.bias" in header):
        fail(f"says bias={info['bias']} but model.safetensors {'lacks' if info['bias'] else 'holds'} {name}.bias")
    if f"{name}.act_scale" in header and not scheme.act_bits:
        fail(f"quantizes no activations ({scheme.name}) but model.safetensors holds {name}.act_scale")
