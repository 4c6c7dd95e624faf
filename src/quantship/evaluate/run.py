"""Evaluation orchestration behind `quantship eval` / `quantship demo` and `quantship.evaluate`:
one baseline against one or more candidates on the same windows, task suites, and a loud warning
when a candidate was calibrated on the text it is evaluated on.

    reports = evaluate_models("smollm2-135m", ["out/w8", "out/w4g64"], EvalSpec(suites=("math",)))
    reports[0].kld.mean, reports[0].candidate.sha256, reports[0].to_json()
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ..specs import EvalSpec
from .results import EvalReport, ModelRef, TaskResults


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def model_ref(name: str, path: Path) -> ModelRef:
    """Name, sha256, bits per weight and size on disk of a model folder or artifact."""
    from ..models.digest import folder_sha256
    from ..models.load import is_artifact

    sha256, digest = folder_sha256(path)
    bpw = None
    if is_artifact(path):
        from ..artifact import read_manifest

        bpw = read_manifest(path)["bits_per_weight"]["quantized_layers"]
        weights = [path / "model.safetensors"]
    else:
        weights = sorted(path.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights if p.is_file()) or None
    return ModelRef(name=name, sha256=sha256, digest=digest, path=str(path), bits_per_weight=bpw, size_bytes=size)


def _load(model, name: str, log) -> tuple[tuple, ModelRef, Path | None]:
    """A name/path or a (model, tokenizer) pair -> (pair, ref, path or None)."""
    from .compare import in_memory_ref

    if isinstance(model, tuple):
        return model, in_memory_ref(model[0], name), None
    from ..models.load import load_model, resolve_model

    path = resolve_model(model, log=log)
    return load_model(path, log=log), model_ref(name, path), path


def _display_name(model, default: str) -> str:
    return default if isinstance(model, tuple) else str(model)


def evaluate_models(baseline, candidates: list, spec: EvalSpec = EvalSpec(), *, items_dir: str | Path | None = None,
                    progress: bool = True, log=print, warn: Callable[[str], None] = _stderr) -> list[EvalReport]:
    """Compare each candidate with the baseline: perplexity and KL statistics on spec's texts, and
    spec's task suites. Models are names/paths or (model, tokenizer) pairs; candidates are loaded one
    at a time. items_dir: per-item suite results go to items_dir/<candidate folder name>/."""
    from .compare import compare

    if not candidates:
        raise ValueError("no candidate to evaluate")
    from ..models.load import check_context

    for model in (baseline, *candidates):  # before any weights are loaded
        if not isinstance(model, tuple):
            check_context(model, spec.ctx, log=log)
    base, base_ref, _ = _load(baseline, _display_name(baseline, "baseline"), log)
    reports = []
    for i, candidate in enumerate(candidates):
        name = _display_name(candidate, f"candidate {i}" if len(candidates) > 1 else "candidate")
        cand, cand_ref, path = _load(candidate, name, log)
        report = compare(base, cand, spec=spec, progress=progress, baseline_ref=base_ref, candidate_ref=cand_ref)
        if path is not None:
            for message in calibration_overlap_warnings(path, base[1], spec):
                warn(message)
        if spec.runs_tasks:
            out_dir = Path(items_dir) / Path(name).name if items_dir else None
            report = _with_tasks(report, run_tasks(base, cand, spec, out_dir=out_dir))
        reports.append(report)
        del cand
    return reports


def _with_tasks(report: EvalReport, tasks: TaskResults) -> EvalReport:
    from dataclasses import replace

    return replace(report, tasks=tasks)


def run_tasks(base, cand, spec: EvalSpec, *, out_dir: Path | None = None) -> TaskResults:
    """spec's task suites on both (model, tokenizer) pairs."""
    from .tasks import run_suites

    results = run_suites(base, cand, spec.suite_names, suite_files=spec.suite_files, full=spec.full, seed=spec.seed,
                         limit=spec.limit, out_dir=out_dir)
    return TaskResults.from_suites(results)


def calibration_overlap_warnings(path: Path, tokenizer, spec: EvalSpec) -> list[str]:
    """Messages for every evaluation text whose windows overlap the data an artifact was calibrated on
    (its scores are optimistic then)."""
    from ..models.load import is_artifact

    if not is_artifact(path):
        return []
    from ..artifact import read_manifest

    calibration = read_manifest(path).get("calibration")
    if not calibration:
        return []
    from ..calib.overlap import find_overlap
    from .compare import load_texts
    from .metrics import make_windows

    messages = []
    for name, text in load_texts(spec.texts).items():
        windows = make_windows(tokenizer(text, add_special_tokens=False)["input_ids"], spec.ctx, spec.max_windows)
        overlap = find_overlap(calibration, windows)
        if overlap:
            messages.append(f"WARNING: {path} was calibrated on data that overlaps the evaluation text {name!r}: "
                            f"{overlap}. Its scores are optimistic; evaluate on held-out text.")
    return messages


def run_demo(model: str, schemes: list[str], spec: EvalSpec = EvalSpec(), *, out_dir: str | Path = "out",
             items_dir: str | Path | None = None, progress: bool = True, log=print) -> list[EvalReport]:
    """The default flow: quantize `model` to each scheme with RTN (artifacts in out_dir) and evaluate
    them against it; the candidates are named "<scheme> rtn"."""
    from ..api import quantize

    if not schemes:
        raise ValueError("no scheme given")
    artifacts = []
    for scheme in schemes:
        out = Path(out_dir) / f"{model}-{scheme}-rtn"
        log(f"quantizing {model} -> {scheme} (rtn) into {out}")
        quantize(model, scheme, method="rtn", out=out, overwrite=True, progress=progress, log=log)
        artifacts.append(str(out))
    reports = evaluate_models(model, artifacts, spec, items_dir=items_dir, progress=progress, log=log)
    return [r.renamed(f"{scheme} rtn") for r, scheme in zip(reports, schemes)]
