"""Export a quantship artifact to another runtime's native format, verified through that runtime's reader.

One writer per target, registered by name (`register_writer`); `export()` checks the output,
asks the writer for its exact per-tensor mapping (or a refusal naming every unmappable scheme),
writes into a temporary folder, verifies there, and renames into place. docs/export.md says
what maps to what.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .base import EXPORT_MANIFEST, ExportError, SourceArtifact, check_export_replaceable, export_manifest, files_of


@dataclass(frozen=True)
class Writer:
    """plan(src) -> per-tensor mapping (raises ExportError naming what cannot be mapped);
    write(src, folder, mapping) writes the files; verify(src, folder, mapping) -> result dict
    with `passed` (reads the files back through the target's own reader)."""

    name: str
    plan: Callable
    write: Callable
    verify: Callable
    description: str


WRITERS: dict[str, Writer] = {}


def register_writer(writer: Writer) -> Writer:
    if writer.name in WRITERS:
        raise ValueError(f"an export writer named {writer.name!r} is already registered")
    WRITERS[writer.name] = writer
    return writer


def get_writer(name: str) -> Writer:
    _load_builtin_writers()
    if name not in WRITERS:
        raise ValueError(f"unknown export target {name!r}; valid: {', '.join(sorted(WRITERS))}")
    return WRITERS[name]


def targets() -> list[str]:
    _load_builtin_writers()
    return sorted(WRITERS)


def _load_builtin_writers() -> None:
    from . import compressed_tensors, gguf_writer, gptq  # noqa: F401  (each registers itself)


def export(artifact: str | Path, to: str, out: str | Path, *, force: bool = False, log=print,
           public_key: str | Path | None = None) -> Path:
    """Export `artifact` to target `to` in folder `out`; returns the folder. Nothing is left at `out`
    unless every weight read back through the target's reader equals quantship's bit for bit. With
    `public_key`, the source artifact must carry a valid signature by that key."""
    from ..fsutil import atomic_dir, atomic_write_json, is_empty_dir

    started = time.perf_counter()
    writer = get_writer(to)
    artifact, out = Path(artifact), Path(out)
    if out.exists() and not is_empty_dir(out):
        if not force:
            raise FileExistsError(f"{out} already exists; pass --force to replace it")
    check_export_replaceable(out, source=artifact)
    src = SourceArtifact.open(artifact, public_key=public_key)
    mapping = writer.plan(src)
    with atomic_dir(out, overwrite=force or is_empty_dir(out)) as tmp:
        extra = writer.write(src, tmp, mapping) or {}
        verification = writer.verify(src, tmp, mapping)
        if not verification.get("passed"):
            raise ExportError(f"the {to} export of {artifact} failed verification and was not written: "
                              f"{verification.get('why', verification)}")
        manifest = export_manifest(src, to, files_of(tmp), mapping, verification, started, extra)
        atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
    log(f"verified: {verification['summary']}")
    return out


__all__ = ["EXPORT_MANIFEST", "ExportError", "Writer", "WRITERS", "export", "get_writer", "register_writer",
           "targets"]
