"""What every export writer shares: the verified source artifact, refusals, the export manifest.

A writer maps each quantized module of a quantship artifact onto its target's grid exactly, or
refuses the whole export naming the schemes it cannot map and why; it never re-quantizes. The
export is written into a temporary folder, verified there by reading it back through the
target's own (third-party) reader, and renamed into place only if every weight matches
quantship's dequantized weight bit for bit. Its manifest (`quantship-export.json`) records the
source artifact's digests, the mapping per tensor and the verification result.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fsutil import canonical_json, hash_tree, sha256_bytes

EXPORT_MANIFEST = "quantship-export.json"
EXPORT_SCHEMA_VERSION = 1
# float tensors, config and tokenizer files the artifact carries besides its quantized layers
ARTIFACT_OWN_FILES = ("model.safetensors", "quantship.json")

# Fixed text for the logits check of runtimes that load the export (deterministic, no data package).
CHECK_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed that "
    "spending on roads and schools should rise, while the cost of administration must fall. "
    "def mean(values):\n    return sum(values) / len(values)\n"
    "Quantization maps real numbers onto a small grid of levels, and a good grid keeps the model's "
    "answers unchanged."
)


class ExportError(ValueError):
    """The artifact cannot be exported to this target (unmappable scheme, failed verification)."""


@dataclass
class QModule:
    """One quantized layer of the source artifact, as quantship stores it (docs/artifacts.md)."""

    name: str
    scheme: object  # formats.scheme.Scheme: the module's own scheme (per-layer schemes are authoritative)
    shape: tuple[int, int]  # (out, in)
    codes: torch.Tensor  # (out, in) uint8 unsigned codes q
    scales: torch.Tensor  # as stored: (out, n_groups) / (out, 1) / (1, 1), fp16 (fp32 for fp8)
    offsets: torch.Tensor | None  # fp16, -asym only
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None  # w8a8 static activation scale
    layer: object = field(repr=False, default=None)  # the loaded QuantLinear

    def dequantize(self) -> torch.Tensor:
        """quantship's own float32 weight for this layer: the reference every export must reproduce."""
        return self.layer.dequantize()


@dataclass
class SourceArtifact:
    path: Path
    manifest: dict
    config: dict
    modules: dict[str, QModule]
    float_tensors: dict[str, torch.Tensor]  # every stored tensor that is not part of a quantized layer
    tied: dict[str, str]  # tensor name -> the stored tensor it is tied to
    model: object = field(repr=False, default=None)
    tokenizer: object = field(repr=False, default=None)

    @classmethod
    def open(cls, path: str | Path, public_key: str | Path | None = None) -> "SourceArtifact":
        """Verify (digests, manifest, tensor headers; the signature with `public_key`) and load an artifact."""
        from safetensors import safe_open

        from ..artifact import load_artifact, verify_artifact

        path = Path(path)
        manifest = verify_artifact(path)
        model, tokenizer = load_artifact(path, public_key=public_key)
        modules = {}
        for name, info in manifest["modules"].items():
            layer = model.get_submodule(name)
            modules[name] = QModule(
                name=name, scheme=layer.scheme, shape=tuple(info["shape"]), codes=layer.codes(),
                scales=layer.scales, offsets=layer.offsets, bias=layer.bias, act_scale=layer.act_scale, layer=layer)
        float_tensors = {}
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                owner = key.rpartition(".")[0]
                if owner not in modules:
                    float_tensors[key] = f.get_tensor(key)
        config = json.loads((path / "config.json").read_text())
        return cls(path=path, manifest=manifest, config=config, modules=modules, float_tensors=float_tensors,
                   tied=dict(manifest.get("tied", {})), model=model, tokenizer=tokenizer)

    def side_files(self) -> list[Path]:
        """config, tokenizer and chat template files: everything but the tensors and the manifest."""
        return [self.path / rel for rel in sorted(self.manifest["files"]) if rel not in ARTIFACT_OWN_FILES]

    def float_linear_names(self) -> list[str]:
        """Linear layers of the model kept in float (lm_head without --quantize-head, --ignore matches)."""
        return [name for name, m in self.model.named_modules()
                if name and name not in self.modules and is_linear_like(m)]


def is_linear_like(module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: the same layer with its weight stored transposed)."""
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def refuse_unmappable(target: str, src: SourceArtifact, reason_of) -> None:
    """Raise one ExportError naming every scheme `reason_of(module)` cannot map (None = mappable)."""
    problems: dict[str, tuple[str, list[str]]] = {}
    for name, m in src.modules.items():
        why = reason_of(m)
        if why:
            problems.setdefault(m.scheme.name, (why, []))[1].append(name)
    if problems:
        parts = [f"{scheme} ({len(names)} layer{'s' * (len(names) > 1)}, e.g. {names[0]}): {why}"
                 for scheme, (why, names) in sorted(problems.items())]
        raise ExportError(f"cannot export {src.path} to {target} without re-quantizing: " + "; ".join(parts))


def copy_side_files(src: SourceArtifact, tmp: Path, skip: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for file in src.side_files():
        rel = file.relative_to(src.path).as_posix()
        if rel in skip:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, tmp / rel)
        copied.append(rel)
    return copied


def compare_weights(name: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    """Bit-exact comparison of one dequantized weight; returns the per-tensor record."""
    got = got.detach().to(torch.float32).reshape(want.shape) if got.numel() == want.numel() else got
    if tuple(got.shape) != tuple(want.shape):
        return {"tensor": name, "bit_exact": False, "why": f"shape {list(got.shape)} != {list(want.shape)}"}
    same = bool(torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32)))
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    return {"tensor": name, "bit_exact": same, "max_abs_diff": diff}


def weight_check_summary(records: list[dict], reader: str) -> dict:
    bad = [r for r in records if not r["bit_exact"]]
    return {"reader": reader, "weights_compared": len(records), "bit_exact": not bad,
            "max_abs_diff": max((r.get("max_abs_diff", math.inf) for r in records), default=0.0),
            "mismatched": [r["tensor"] for r in bad][:20]}


def kld_mean(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P_cand) over the full vocabulary (float64)."""
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(cand_logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def check_ids(tokenizer, limit: int = 128) -> torch.Tensor:
    return torch.tensor([tokenizer(CHECK_TEXT, add_special_tokens=False)["input_ids"][:limit]])


def quantship_logits(src: SourceArtifact, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return src.model(input_ids=ids).logits[0].float()


def library_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(module: str, dist: str, target: str):
    """Import a verifying library or say how to install it (`pip install quantship[export]`)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"exporting to {target} verifies the export with {dist!r}, which is not installed "
                          f"({e}); install the pinned readers with `pip install -e '.[export]'`") from None


def export_manifest(src: SourceArtifact, target: str, files: dict[str, str], tensors: dict,
                    verification: dict, started: float, extra: dict | None = None) -> dict:
    from ..artifact import content_hash, environment

    manifest = {
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "target": target,
        "source_artifact": {
            "path": str(src.path),
            "content_sha256": src.manifest["content_sha256"],
            "manifest_sha256": src.manifest["manifest_sha256"],
            "scheme": src.manifest["scheme"],
            "method": src.manifest["method"]["name"],
            "source_model": src.manifest["source"].get("name"),
        },
        "tensors": tensors,
        "verification": verification,
        **(extra or {}),
        "environment": environment(),
        "export_s": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "content_sha256": content_hash(files),
    }
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = sha256_bytes(canonical_json(body).encode())
    return manifest


def read_export_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / EXPORT_MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{file} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ExportError(f"{file} is not a quantship export manifest")
    return manifest


def verify_export(path: str | Path) -> dict:
    """An export's own digests: manifest_sha256, every listed file's sha256, no unlisted file."""
    from ..artifact import content_hash
    from ..fsutil import sha256_file
    from ..signing import SIGNATURE

    path = Path(path)
    manifest = read_export_manifest(path)
    problems = []
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if sha256_bytes(canonical_json(body).encode()) != manifest.get("manifest_sha256"):
        problems.append(f"{EXPORT_MANIFEST}: manifest_sha256 does not match the manifest (the manifest was edited)")
    for rel, digest in sorted(manifest["files"].items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{rel}: sha256 mismatch (the file was changed after it was written)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {EXPORT_MANIFEST, SIGNATURE}
    problems += [f"{rel}: not listed in {EXPORT_MANIFEST}" for rel in sorted(present - set(manifest["files"]))]
    if content_hash(manifest["files"]) != manifest.get("content_sha256"):
        problems.append(f"{EXPORT_MANIFEST}: content_sha256 does not match its file list")
    if problems:
        raise ExportError(f"export {path} failed verification: " + "; ".join(problems))
    return manifest


def check_export_replaceable(target: str | Path, *, source: Path) -> None:
    """`--force` replaces only an export quantship wrote (nothing but its listed files), never the source;
    an empty folder may be used (the rule of artifact.check_replaceable)."""
    from ..artifact import check_replaceable_folder

    check_replaceable_folder(target, source=source, what="export", source_what="artifact being exported",
                             manifest_name=EXPORT_MANIFEST, listed_files=lambda t: read_export_manifest(t)["files"],
                             errors=(ExportError,))


def files_of(tmp: Path) -> dict[str, str]:
    return hash_tree(tmp, exclude=(EXPORT_MANIFEST,))


def module_state(src, module_tensors) -> dict:
    """The export's tensors: the source's float tensors, each module's `module_tensors(m)` under its
    name, and its bias."""
    state = dict(src.float_tensors)
    for name, m in src.modules.items():
        for key, t in module_tensors(m).items():
            state[f"{name}.{key}"] = t
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.contiguous()
    return state
