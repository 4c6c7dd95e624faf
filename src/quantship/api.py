"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import load_artifact, verify_artifact, write_artifact
from .models.load import load_model, resolve_model
from .specs import EvalSpec, QuantSpec


def quantize(model: str | Path, scheme: str, *, method: str = "rtn", out: str | Path | None = None,
             overwrite: bool = False, method_params: dict[str, Any] | None = None,
             overrides: dict[str, str] | list | tuple = (), ignore: tuple[str, ...] = (),
             quantize_head: bool = False, seed: int = 0, calib: str | None = None, calib_samples: int = 128,
             calib_seqlen: int = 512, progress: bool = True, log=print):
    """Quantize a built-in or local HF model. Writes an artifact when `out` is given (returns its path),
    else returns the in-memory QuantResult.

    overrides: per-layer schemes, in order, the last match winning: {regex: scheme} (e.g.
    {"down_proj": "w8"}), (regex, scheme) pairs, or "regex=scheme" strings as the CLI's --override."""
    from .pipeline import plan_schemes, quantize_model

    spec = QuantSpec(scheme=scheme, method=method, method_params=tuple((method_params or {}).items()),
                     overrides=_overrides(overrides), ignore=tuple(ignore), quantize_head=quantize_head, seed=seed, calib=calib,
                     calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    source = resolve_model(model, log=log)
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
    model_obj, tokenizer = load_model(source, dtype=torch.float32, log=log)
    plan_schemes(model_obj, spec)  # overrides, group sizes, method x scheme: before calibration data is built
    calib_set = _calibration(spec, model_obj, tokenizer)
    result = quantize_model(model_obj, tokenizer, spec, source=source, progress=progress, calib=calib_set)
    if calib_set is not None:
        result.calibration = calib_set.info
    if out is None:
        return result
    return write_artifact(result, out, overwrite=overwrite)


def _overrides(overrides) -> tuple[tuple[str, str], ...]:
    from .specs import parse_overrides

    if isinstance(overrides, dict):
        return tuple((str(k), str(v)) for k, v in overrides.items())
    if isinstance(overrides, str):
        overrides = [overrides]
    strings = [o for o in overrides if isinstance(o, str)]
    if strings and len(strings) != len(overrides):
        raise ValueError("overrides: give either 'regex=scheme' strings or (regex, scheme) pairs, not both")
    return parse_overrides(strings) if strings else tuple(tuple(o) for o in overrides)


def _calibration(spec: QuantSpec, model, tokenizer):
    from .methods.registry import get_method

    if not get_method(spec.method).needs_calibration:
        return None
    from .calib import build_calibration  # provided by the calibration package

    return build_calibration(spec, model, tokenizer)


def evaluate(baseline, candidate, *, texts=None, ctx: int = 512, max_windows: int = 40, batch_size: int = 4,
             progress: bool = True, log=print) -> dict:
    """Compare a candidate with its baseline. Models: names/paths or (model, tokenizer) pairs."""
    from .evaluate.compare import compare

    spec = EvalSpec(ctx=ctx, max_windows=max_windows, batch_size=batch_size)
    base = baseline if isinstance(baseline, tuple) else load_model(baseline, log=log)
    cand = candidate if isinstance(candidate, tuple) else load_model(candidate, log=log)
    return compare(base, cand, texts=texts, spec=spec, progress=progress)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load a verified artifact (or any model name/path) -> (model, tokenizer)."""
    path = Path(path)
    if (path / "quantship.json").is_file():
        return load_artifact(path, dtype=dtype)
    return load_model(path, dtype=dtype)


def verify(path: str | Path) -> dict:
    return verify_artifact(path)
