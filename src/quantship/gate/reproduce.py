"""`quantship reproduce ARTIFACT`: quantize the artifact's source again from its manifest (source
model by hash, method, parameters, targets, seed, calibration spec) and compare every tensor.

The source must be the one the manifest names, byte for byte: a built-in is found by name, a folder
by its recorded path; either way each file's sha256 must equal the manifest's `source.files`, else
nothing is re-quantized (ReproduceError says which file differs). The calibration set is rebuilt from
the recorded spec, seed and sizes and its sha256 checked against the manifest's before the tensors
are compared.

    result = reproduce("out/w4g64-gptq")
    result["identical"], result["differ"]  # [{name, why, max_abs_diff, differing_elements}]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


class ReproduceError(RuntimeError):
    """The artifact cannot be re-quantized here (source missing or different, unreadable manifest)."""


def find_source(manifest: dict) -> Path:
    """The manifest's source model, located by name (built-ins) or path, every file's hash checked."""
    from ..fsutil import sha256_file
    from ..models.builtin import BUILTINS, SOURCE_MANIFEST, model_dir

    source = manifest["source"]
    recorded = source["files"]
    candidates = []
    if source.get("name") in BUILTINS:
        candidates.append(model_dir(source["name"]))
    if source.get("path"):
        candidates.append(Path(source["path"]))
    for folder in candidates:
        if not folder.is_dir():
            continue
        marker = folder / SOURCE_MANIFEST
        for rel, sha in recorded.items():
            path = folder / rel
            if not path.is_file():
                raise ReproduceError(f"source {folder} has no file {rel} (the manifest records it)")
            if sha256_file(path) != sha:
                raise ReproduceError(f"source {folder}: {rel} has sha256 {sha256_file(path)[:16]}…, the manifest "
                                     f"records {sha[:16]}…; this is not the model the artifact was made from")
        if source.get("name") in BUILTINS and not marker.is_file():
            raise ReproduceError(f"source {folder} is not a pulled built-in (no {SOURCE_MANIFEST})")
        return folder
    hint = f"run `quantship model pull {source['name']}`" if source.get("name") in BUILTINS else \
        f"the folder {source.get('path')} is not on this machine"
    raise ReproduceError(f"source model {source.get('name')!r} is not available: {hint}")


def quant_args(manifest: dict) -> dict:
    """The api.quantize keyword arguments that made this artifact."""
    calib = manifest.get("calibration")
    targets = manifest.get("targets") or {}
    args = {"scheme": manifest["scheme"], "method": manifest["method"]["name"],
            "method_params": dict(manifest["method"].get("params") or {}), "ignore": tuple(targets.get("ignore", ())),
            "quantize_head": bool(targets.get("quantize_head", False)), "seed": int(manifest.get("seed", 0))}
    if manifest.get("overrides"):  # per-layer schemes: (regex, scheme) pairs in order, the last match wins
        args["overrides"] = tuple(tuple(o) for o in manifest["overrides"])
    if calib:
        args.update(calib=None if calib["spec"] == "default" else calib["spec"], calib_samples=int(calib["samples"]),
                    calib_seqlen=int(calib["seqlen"]))
    return args


def compare_tensors(a_path: Path, b_path: Path) -> tuple[int, list[dict]]:
    """-> (tensor count, differences) between two safetensors files, tensor by tensor."""
    from safetensors import safe_open

    differ = []
    with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b:
        names_a, names_b = set(a.keys()), set(b.keys())
        for name in sorted(names_a ^ names_b):
            differ.append({"name": name, "why": "only in the " + ("original" if name in names_a else "re-quantized")})
        for name in sorted(names_a & names_b):
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                differ.append({"name": name, "why": f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"})
                continue
            xb, yb = x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
            if torch.equal(xb, yb):
                continue
            if x.is_floating_point():
                diff = (x.double() - y.double()).abs()
                ne = int((x != y).sum())
                differ.append({"name": name, "why": f"{ne} of {x.numel()} values differ, max |diff| "
                                                    f"{float(diff.max()):.3g}", "differing_elements": ne,
                               "max_abs_diff": float(diff.max())})
            else:
                ne = int((x != y).sum())
                diff = (x.long() - y.long()).abs()
                differ.append({"name": name, "why": f"{ne} of {x.numel()} elements differ (packed codes), max "
                                                    f"|diff| {int(diff.max())}", "differing_elements": ne,
                               "max_abs_diff": float(diff.max())})
        return len(names_a | names_b), differ


def reproduce(artifact: str | Path, *, progress: bool = True, log=print) -> dict:
    from ..api import quantize
    from ..artifact import ArtifactError, verify_artifact

    artifact = Path(artifact)
    try:
        manifest = verify_artifact(artifact)
    except (ArtifactError, OSError, ValueError) as e:
        raise ReproduceError(f"{artifact}: {e}") from e
    source = find_source(manifest)
    args = quant_args(manifest)
    log(f"re-quantizing {source} ({args['scheme']}, {args['method']}, seed {args['seed']})")
    with tempfile.TemporaryDirectory(prefix=".reproduce.", dir=artifact.parent) as tmp:
        out = Path(tmp) / "artifact"
        try:
            quantize(str(source), out=out, progress=progress, log=log, **args)
        except TypeError as e:
            raise ReproduceError(f"this quantship cannot re-make the artifact's settings: {e}") from e
        again = json.loads((out / "quantship.json").read_text())
        result = {"artifact": str(artifact), "source": str(source),
                  "settings": {**args, "ignore": list(args["ignore"]),
                               "overrides": [list(o) for o in args.get("overrides", ())]},
                  "calibration_sha256": {"original": (manifest.get("calibration") or {}).get("sha256"),
                                         "again": (again.get("calibration") or {}).get("sha256")}}
        tensors, differ = compare_tensors(artifact / "model.safetensors", out / "model.safetensors")
        modules_same = again["modules"] == manifest["modules"]
    calib = result["calibration_sha256"]
    if calib["original"] != calib["again"]:
        differ.insert(0, {"name": "(calibration set)", "why": f"sha256 {str(calib['again'])[:16]}… vs recorded "
                                                             f"{str(calib['original'])[:16]}…"})
    if not modules_same:
        differ.insert(0, {"name": "(manifest modules)", "why": "per-module schemes or shapes differ"})
    result.update(tensors=tensors, identical=not differ, differ=differ,
                  content_sha256={"original": manifest["content_sha256"], "again": again["content_sha256"]})
    return result
