"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import load_artifact, verify_artifact, write_artifact
from .fsutil import check_output_location, is_empty_dir
from .models.load import float32_bytes, load_model, resolve_model
from .specs import EvalSpec, QuantSpec


def quantize(model: str | Path, scheme: str, *, method: str = "rtn", out: str | Path | None = None,
             overwrite: bool = False, method_params: dict[str, Any] | None = None, ignore: tuple[str, ...] = (),
             quantize_head: bool = False, seed: int = 0, calib: str | None = None, calib_samples: int = 128,
             calib_seqlen: int = 512, progress: bool = True, log=print):
    """Quantize a built-in or local HF model. Writes an artifact when `out` is given (returns its path),
    else returns the in-memory QuantResult."""
    from .pipeline import quantize_model

    spec = QuantSpec(scheme=scheme, method=method, method_params=tuple((method_params or {}).items()),
                     ignore=tuple(ignore), quantize_head=quantize_head, seed=seed, calib=calib,
                     calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    _check_method(spec)
    if out is not None:  # every check that needs no model weights runs before anything is loaded or pulled
        local = Path(str(model)).expanduser()
        _check_replace(out, overwrite, source=local if local.exists() else None)
    source = resolve_model(model, log=log)
    if out is not None:
        _check_replace(out, overwrite, source=source)
        check_output_location(out, float32_bytes(source) + _OUTPUT_MARGIN)
        overwrite = overwrite or is_empty_dir(out)
    model_obj, tokenizer = load_model(source, dtype=torch.float32, log=log)
    calib_set = _calibration(spec, model_obj, tokenizer)
    result = quantize_model(model_obj, tokenizer, spec, source=source, progress=progress, calib=calib_set)
    if calib_set is not None:
        result.calibration = calib_set.info
    if out is None:
        return result
    return write_artifact(result, out, overwrite=overwrite)


def _check_method(spec: QuantSpec) -> None:
    from .methods.registry import get_method

    method = get_method(spec.method)  # unknown names list the valid ones
    method.make_params(spec.params)  # unknown or ill-typed parameters
    method.check_scheme(spec.parsed_scheme)


_OUTPUT_MARGIN = 64 << 20  # tokenizer files and the manifest beside the tensors


def _check_replace(out: str | Path, overwrite: bool, *, source: Path | None) -> None:
    """An existing output folder is replaced only with overwrite, and only if it is an artifact."""
    from .artifact import check_replaceable

    out = Path(out)
    if out.exists() and not is_empty_dir(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
        check_replaceable(out, source=source)


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
