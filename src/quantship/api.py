"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .artifact import load_artifact, verify_artifact, write_artifact
from .fsutil import check_output_location, is_empty_dir
from .models.load import float32_bytes, load_model, resolve_model
from .specs import EvalSpec, QuantSpec, default_of


def _d(cls, name: str):
    return default_of(cls, name)


def quantize(model: str | Path | tuple, scheme: str, *, method: str = _d(QuantSpec, "method"),
             out: str | Path | None = None, overwrite: bool = False, method_params: dict[str, Any] | None = None,
             overrides: dict[str, str] | list | tuple = (), ignore: tuple[str, ...] = _d(QuantSpec, "ignore"),
             quantize_head: bool = _d(QuantSpec, "quantize_head"), seed: int = _d(QuantSpec, "seed"),
             calib: str | None = _d(QuantSpec, "calib"), calib_samples: int = _d(QuantSpec, "calib_samples"),
             calib_seqlen: int = _d(QuantSpec, "calib_seqlen"), source: str | Path | None = None,
             reclaim_memory: bool = False, progress: bool = True, log=print):
    """Quantize a built-in or local HF model. Writes an artifact when `out` is given (returns its path),
    else returns the in-memory QuantResult.

    model: a name/path, or a loaded (model, tokenizer) pair: that model is left as it was (a copy is
    quantized) and `source` names its folder for the manifest (default: the folder it was loaded from).
    overrides: per-layer schemes, in order, the last match winning: {regex: scheme} (e.g.
    {"down_proj": "w8"}), (regex, scheme) pairs, or "regex=scheme" strings as the CLI's --override.
    reclaim_memory: for one-shot processes (the CLI): hand the float weights' file pages back to the OS
    during calibrated methods and fix glibc's mmap threshold for the process (memory.reclaiming_memory).
    Nothing else outlives the call: torch's thread count and RNG state are as they were."""
    from .pipeline import plan_schemes, quantize_model

    spec = QuantSpec(scheme=scheme, method=method, method_params=tuple((method_params or {}).items()),
                     overrides=_overrides(overrides), ignore=tuple(ignore), quantize_head=quantize_head, seed=seed, calib=calib,
                     calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    _check_before_loading(spec)
    loaded = isinstance(model, tuple)
    if out is not None:  # every check that needs no model weights runs before anything is loaded or pulled
        local = Path(str(source if loaded else model)).expanduser()
        _check_replace(out, overwrite, source=local if local.exists() else None)
    if loaded:
        model_obj, tokenizer, source = _copy_of_loaded(model, source)
    else:
        source = resolve_model(model, log=log)
    if out is not None:
        _check_replace(out, overwrite, source=source)
        check_output_location(out, float32_bytes(source) + _OUTPUT_MARGIN)
        overwrite = overwrite or is_empty_dir(out)
    if not loaded:
        model_obj, tokenizer = load_model(source, dtype=torch.float32, log=log)
    plan_schemes(model_obj, spec)  # overrides, group sizes, method x scheme: before calibration data is built
    calib_set = _calibration(spec, model_obj, tokenizer)
    result = quantize_model(model_obj, tokenizer, spec, source=source, progress=progress, calib=calib_set,
                            reclaim_memory=reclaim_memory)
    if calib_set is not None:
        result.calibration = calib_set.info
    if out is None:
        return result
    return write_artifact(result, out, overwrite=overwrite)


def _check_before_loading(spec: QuantSpec) -> None:
    """What can be checked without the model: the method exists, takes its parameters and the
    scheme, and the calibration spec parses (layer shapes are checked once the model is loaded)."""
    from .formats.scheme import parse_scheme
    from .methods.registry import get_method

    method = get_method(spec.method)
    params = method.make_params(spec.params)
    method.check_scheme(spec.parsed_scheme, params)
    for pattern, scheme in spec.overrides:
        method.check_scheme(parse_scheme(scheme), params, override=f"{pattern}={scheme}")
    if method.needs_calibration:
        from .calib.sources import parse_source_spec

        parse_source_spec(spec.calib)


def _copy_of_loaded(pair: tuple, source: str | Path | None):
    """(model, tokenizer) given by the caller -> (a deep copy to quantize, tokenizer, source folder)."""
    import copy

    model, tokenizer = pair
    folder = Path(source if source is not None else getattr(model, "name_or_path", "") or "")
    if not str(folder) or not folder.is_dir():
        raise ValueError("quantize((model, tokenizer), ...) needs the model's folder for the manifest: "
                         "pass source=<the folder it was loaded from>")
    return copy.deepcopy(model), tokenizer, folder


_OUTPUT_MARGIN = 64 << 20  # tokenizer files and the manifest beside the tensors


def _check_replace(out: str | Path, overwrite: bool, *, source: Path | None) -> None:
    """An existing output folder is replaced only with overwrite, and only if it is an artifact."""
    from .artifact import check_replaceable

    out = Path(out)
    if out.exists() and not is_empty_dir(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --force) to replace it")
        check_replaceable(out, source=source)


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


def evaluate(baseline, candidate, *, texts=_d(EvalSpec, "texts"), ctx: int = _d(EvalSpec, "ctx"),
             max_windows: int = _d(EvalSpec, "max_windows"), batch_size: int = _d(EvalSpec, "batch_size"),
             suites=_d(EvalSpec, "suites"), suite_files=_d(EvalSpec, "suite_files"), full: bool = _d(EvalSpec, "full"),
             limit: int | None = _d(EvalSpec, "limit"), seed: int = _d(EvalSpec, "seed"),
             items_dir: str | Path | None = None, progress: bool = True, log=print):
    """Compare a candidate with its baseline (as `quantship eval`): perplexity and KL statistics on
    `texts` (default: the news corpus's eval split), plus task `suites`. Models: names/paths or
    (model, tokenizer) pairs. A list of candidates gives a list of EvalReports, else one EvalReport.
    The settings are checked (EvalSpec) before any model is loaded."""
    from .evaluate.run import evaluate_models

    spec = EvalSpec(ctx=ctx, max_windows=max_windows, batch_size=batch_size, texts=texts or (), suites=suites,
                    suite_files=suite_files, full=full, limit=limit, seed=seed)
    several = isinstance(candidate, list)
    reports = evaluate_models(baseline, candidate if several else [candidate], spec, items_dir=items_dir,
                              progress=progress, log=log)
    return reports if several else reports[0]


def bench(model: str | Path, **options):
    """Speed and memory of a model or artifact on the engine (as `quantship bench`); options are
    BenchSpec's fields, checked before the model is loaded. -> BenchReport."""
    from .bench.run import run_bench
    from .specs import BenchSpec

    progress = options.pop("progress", True)
    return run_bench(BenchSpec(model=str(model), **options), progress=progress)


def load(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load a verified artifact (or any model name/path) -> (model, tokenizer)."""
    path = Path(path)
    if (path / "quantship.json").is_file():
        return load_artifact(path, dtype=dtype)
    return load_model(path, dtype=dtype)


def verify(path: str | Path) -> dict:
    return verify_artifact(path)
