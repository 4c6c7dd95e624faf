"""sha256 of a model, so a report can name exactly which model it measured.

    artifact               the manifest's content_sha256
    built-in / HF folder   sha256 of the canonical JSON of {relative path: sha256 of the file}; a
                           built-in's file hashes are the ones recorded at pull time in its source
                           manifest (quantship-source.json, itself left out), other folders are hashed
    in-memory model        sha256 over its state dict (names, dtypes, shapes, bytes)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..fsutil import canonical_json, hash_tree, sha256_bytes
from .builtin import SOURCE_MANIFEST


def files_digest(files: dict[str, str]) -> str:
    """The digest of a folder from its {relative path: sha256} table."""
    return sha256_bytes(canonical_json(dict(sorted(files.items()))).encode())


def folder_sha256(path: str | Path) -> tuple[str, str]:
    """-> (sha256, kind) of an artifact ("artifact") or a model folder ("files")."""
    path = Path(path)
    manifest = path / "quantship.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["content_sha256"], "artifact"
    source = path / SOURCE_MANIFEST
    if source.is_file():
        return files_digest(json.loads(source.read_text())["files"]), "files"
    return files_digest(hash_tree(path, exclude=(SOURCE_MANIFEST,))), "files"


@torch.no_grad()
def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict in name order: name, dtype, shape and raw bytes of each tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
