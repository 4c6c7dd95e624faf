"""Native CPU kernels (AVX2 + FMA + F16C), compiled on first use with torch's extension builder.

`available()` compiles `csrc/*.cpp` once per source hash into the quantship home
(`native/<hash>/`, reused by later processes) and registers `torch.ops.quantship.*`. Where the CPU lacks
AVX2, no compiler works, or QUANTSHIP_NATIVE=0 is set, it returns False (with the reason in
`unavailable_reason()`) and callers keep torch's own kernels: the native path is an accelerator,
never a requirement.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.cpp"))
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_STALE_LOCK_S = 600  # a real build takes ~25-60 s on 2 cores
# The outcome of building and registering the ops (torch.ops registration lasts for the process):
# {"ok": bool, "reason": str | None}, filled by the first available() that is not disabled.
_build_outcome: dict = {}
_warned: set[str] = set()  # reasons already logged (the fallback is said once per process)


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(_CSRC.glob("*.[ch]*")):  # sources and headers
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _cpu_supported() -> str | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability}: the native kernels need AVX2"
    return None


def _build() -> None:
    from torch.utils.cpp_extension import load

    from ..models.builtin import quantship_home

    build_dir = quantship_home() / "native" / _source_hash()
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"  # torch's build lock: a build killed midway leaves it, and later loads would wait forever
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        log.warning("removing a stale native build lock %s (a build was interrupted)", lock)
        lock.unlink(missing_ok=True)
    with _ninja_on_path():
        load(name="quantship_native", sources=[str(p) for p in _SOURCES], extra_cflags=_CFLAGS,
             extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)


@contextmanager
def _ninja_on_path():
    """Inside: the interpreter's bin folder (where the `ninja` wheel installs) is on PATH when no
    ninja is found otherwise; PATH is restored on exit (the build needs it, nothing after does)."""
    if shutil.which("ninja") is not None:
        yield
        return
    saved = os.environ.get("PATH")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved or ''}"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def _disabled_reason() -> str | None:
    """QUANTSHIP_NATIVE=0, read on every call: a process may switch the native path off at any time."""
    return "disabled by QUANTSHIP_NATIVE=0" if os.environ.get("QUANTSHIP_NATIVE", "1") == "0" else None


def available() -> bool:
    """Compile (first call per source version) and register the native ops; -> whether they can be used."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the native kernels are not used (None when they are)."""
    disabled = _disabled_reason()
    if disabled is not None:
        if disabled not in _warned:
            _warned.add(disabled)
            log.warning("quantship native kernels unavailable (%s); using torch's kernels", disabled)
        return disabled
    if not _build_outcome:
        reason = _cpu_supported()
        if reason is None:
            try:
                _build()
            except (RuntimeError, OSError, ImportError) as e:  # no compiler / ninja / headers: fall back
                reason = f"building the native kernels failed: {e}"
        if reason is not None:
            log.warning("quantship native kernels unavailable (%s); using torch's kernels", reason)
        _build_outcome.update(ok=reason is None, reason=reason)
    return _build_outcome["reason"]



def pack_int4_blocks(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15, K % 32 == 0 -> (N, K/2) uint8: per 32-code block, byte j = code[j] | code[j+16] << 4."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"int4 blocks need in_features divisible by 32, got {k}")
    blocks = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
