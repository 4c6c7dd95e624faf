"""`quantship release RECIPE -o RUN_DIR`: walk a ladder of candidates in order of preference
("int8 first, int4 only if quality holds"); each rung is quantized, evaluated, benchmarked (when the
budget has performance terms) and gated; the first rung that passes is chosen.

Recipe (YAML; docs/gate.md):

    model: smollm2-135m                  # built-in name or HF folder
    budget: budget.yaml                  # a path (relative to the recipe) or the budget inline
    calibration: {source: news, samples: 128, seqlen: 512}   # calibrated rungs (gptq, awq, ...)
    eval: {max_windows: 20, limit: 20}   # over the budget's eval section
    bench: {output_len: 64}              # over the budget's bench section
    ladder:                              # default: w8 rtn, w4g64 gptq, w4g64 awq+gptq
      - {scheme: w8, method: rtn}
      - {scheme: w4g64, method: gptq, params: {percdamp: 0.01}, overrides: {down_proj: w8}}

Run folder: RUN_DIR/rungs/SCHEME-METHOD-KEY/{artifact/, eval.json, bench.json, gate.json}, the
baseline's bench in RUN_DIR/baseline/, and RUN_DIR/decision.json. KEY hashes the rung's inputs (source
model sha256, quantization spec, eval and bench settings, quantship version): a rerun of the same
recipe finds every finished rung and reuses it; a changed input gets a new folder. Every file is
written atomically (quantship.fsutil) and an artifact appears only complete, so Ctrl-C leaves no
half rung: the rerun picks up at the first unfinished step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .budget import Budget, BudgetError, load_budget, parse_budget

RECIPE_KEYS = ("model", "budget", "calibration", "eval", "bench", "ladder")
RUNG_KEYS = ("scheme", "method", "params", "overrides", "ignore", "quantize_head", "seed", "name", "search")
CALIB_KEYS = ("source", "samples", "seqlen")
DEFAULT_LADDER = ({"scheme": "w8", "method": "rtn"}, {"scheme": "w4g64", "method": "gptq"},
                  {"scheme": "w4g64", "method": "awq+gptq"})


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the bad key and the valid ones."""


def search_available() -> bool:
    """Whether this quantship has the mixed-precision search (the ladder's last default rung)."""
    import importlib.util

    return importlib.util.find_spec("quantship.search") is not None


@dataclass(frozen=True)
class Rung:
    name: str
    spec: Any  # QuantSpec

    def to_json(self) -> dict:
        spec = asdict(self.spec)
        spec["method_params"] = [list(p) for p in self.spec.method_params]
        spec["ignore"] = list(self.spec.ignore)
        spec["overrides"] = [list(p) for p in self.spec.overrides]
        return {"name": self.name, "spec": spec}


@dataclass(frozen=True)
class Recipe:
    model: str
    budget: Budget
    ladder: tuple[Rung, ...]
    notes: tuple[str, ...] = ()
    source: dict = field(default_factory=dict)  # the recipe as read


def _check_keys(where: str, data: Any, valid: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in valid:
            raise RecipeError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")
    return data


def parse_recipe(data: Any, *, base_dir: Path = Path("."), where: str = "recipe") -> Recipe:
    data = _check_keys(where, data if data is not None else {}, RECIPE_KEYS)
    if not data.get("model"):
        raise RecipeError(f"{where}: 'model' is required (a built-in name or a Hugging Face folder)")
    raw_budget = data.get("budget")
    if isinstance(raw_budget, str):
        path = Path(raw_budget) if Path(raw_budget).is_absolute() else base_dir / raw_budget
        budget = load_budget(path)
    elif isinstance(raw_budget, dict):
        budget = parse_budget(raw_budget, where=f"{where}: budget")
    else:
        raise RecipeError(f"{where}: 'budget' is required: a budget file path or the budget inline (docs/gate.md)")
    for section in ("eval", "bench"):
        extra = data.get(section) or {}
        merged = parse_budget({section: {**getattr(budget, section), **_check_keys(f"{where}: {section}", extra,
                                                                                   _section_keys(section))}},
                              where=f"{where}")
        budget = replace(budget, **{section: getattr(merged, section)})
    if budget.empty:
        raise BudgetError(f"{where}: the budget has no terms; nothing to decide")
    calib = _check_keys(f"{where}: calibration", data.get("calibration") or {}, CALIB_KEYS)
    notes = []
    ladder_data = data.get("ladder")
    if ladder_data is None:
        ladder_data = list(DEFAULT_LADDER)
        if search_available():
            ladder_data.append({"search": {}})
        else:
            notes.append("mixed-precision search rung: not available in this quantship (no quantship.search)")
    if not isinstance(ladder_data, list) or not ladder_data:
        raise RecipeError(f"{where}: 'ladder' must be a non-empty list of rungs ({{scheme, method, ...}})")
    rungs = [_parse_rung(f"{where}: ladder[{i}]", item, calib) for i, item in enumerate(ladder_data)]
    return Recipe(model=str(data["model"]), budget=budget, ladder=tuple(rungs), notes=tuple(notes), source=data)


def _parse_rung(at: str, item: Any, calib: dict) -> Rung:
    """One ladder entry -> Rung; every check that needs no model (method, parameters, scheme,
    overrides, calibration spec) runs here, before anything is quantized."""
    from ..api import _check_before_loading, _overrides
    from ..methods.registry import get_method
    from ..specs import QuantSpec

    item = _check_keys(at, item, RUNG_KEYS)
    if "search" in item:
        raise RecipeError(f"{at}: the mixed-precision search rung is not available in this quantship "
                          f"(no quantship.search package)")
    if "scheme" not in item:
        raise RecipeError(f"{at}: 'scheme' is required")
    method = str(item.get("method", "rtn"))
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{at}: params must be a mapping")
    try:
        spec = QuantSpec(scheme=str(item["scheme"]), method=method, method_params=tuple(sorted(params.items())),
                         overrides=_overrides(item.get("overrides") or ()), ignore=tuple(item.get("ignore") or ()),
                         quantize_head=bool(item.get("quantize_head", False)), seed=int(item.get("seed", 0)))
        if get_method(spec.method).needs_calibration:
            spec = replace(spec, calib=calib.get("source"), calib_samples=int(calib.get("samples", 128)),
                           calib_seqlen=int(calib.get("seqlen", 512)))
        _check_before_loading(spec)
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"{at}: {e}") from e
    return Rung(name=str(item.get("name") or f"{item['scheme']} {method}"), spec=spec)


def _section_keys(section: str) -> tuple[str, ...]:
    from .budget import BENCH_KEYS, EVAL_KEYS

    return EVAL_KEYS if section == "eval" else BENCH_KEYS


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(data, base_dir=path.parent, where=str(path))


def _key(obj) -> str:
    from ..fsutil import canonical_json, sha256_bytes

    return sha256_bytes(canonical_json(obj).encode())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text).strip("-")


def rung_key(baseline_sha: str, rung: Rung, budget: Budget) -> str:
    """Hash of everything a rung's results depend on (not the limits: a changed limit re-judges)."""
    from .. import __version__

    eval_spec = asdict(budget.eval_spec())
    bench_spec = asdict(budget.bench_spec("-")) if budget.needs_bench else None
    return _key({"source": baseline_sha, "quant": rung.to_json()["spec"], "eval": eval_spec, "bench": bench_spec,
                 "quantship": __version__})


def run_release(recipe_path: str | Path, run_dir: str | Path, *, progress: bool = True, log=print) -> dict:
    """Walk the ladder; write RUN_DIR/decision.json; return it."""
    from ..fsutil import atomic_write_json, atomic_write_text
    from .run import model_identity

    recipe = load_recipe(recipe_path)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", Path(recipe_path).read_text(encoding="utf-8"))
    base = model_identity(recipe.model, log=log)
    rungs, chosen = [], None
    t_start = time.perf_counter()
    for rung in recipe.ladder:
        key = rung_key(base["sha256"], rung, recipe.budget)
        # no ladder position in the name: a reordered or extended ladder finds its finished rungs too
        folder = run_dir / "rungs" / f"{_slug(rung.spec.scheme)}-{_slug(rung.spec.method)}-{key[:12]}"
        record = run_rung(recipe, rung, folder, key, base, run_dir, progress=progress, log=log)
        rungs.append(record)
        if record["passed"]:
            chosen = record
            break
    skipped = [r.name for r in recipe.ladder[len(rungs):]]
    decision = {
        "recipe": str(recipe_path), "model": base, "budget": recipe.budget.to_json(),
        "chosen": _chosen(chosen) if chosen else None,
        "why": (f"{chosen['name']} is the first rung in order of preference that holds every budget term"
                if chosen else "no rung holds the budget"),
        "closest_miss": None if chosen else _closest_miss(rungs),
        "rungs": rungs, "not_tried": skipped, "notes": list(recipe.notes),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }
    atomic_write_json(run_dir / "decision.json", decision)
    log(f"decision: {decision['why']}" + (f" -> {chosen['artifact']}" if chosen else
                                          f"; closest miss: {decision['closest_miss']['name']}"))
    return decision


def _chosen(record: dict) -> dict:
    return {k: record[k] for k in ("name", "artifact", "sha256", "bits_per_weight", "model_bytes")}


def _closest_miss(rungs: list[dict]) -> dict | None:
    """The rung with the fewest failed terms, then the smallest relative excess over the limits."""
    def excess(r):
        total = 0.0
        for t in r["failed"]:
            if t["measured"] is None:
                return float("inf")
            total += abs(t["judged"] - t["limit"]) / max(abs(t["limit"]), 1e-12)
        return total

    if not rungs:
        return None
    best = min(rungs, key=lambda r: (len(r["failed"]), excess(r)))
    return {"name": best["name"], "artifact": best["artifact"], "failed": best["failed"]}


def run_rung(recipe: Recipe, rung: Rung, folder: Path, key: str, base: dict, run_dir: Path, *, progress, log) -> dict:
    """Quantize (unless the artifact is there), gate with whatever is stored, store what was measured."""
    from ..fsutil import atomic_write_json
    from .run import run_gate

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / "artifact"
    steps = {}
    if not _artifact_ok(artifact):
        from ..api import quantize

        log(f"[{rung.name}] quantizing {recipe.model} -> {artifact}")
        s = rung.spec
        quantize(recipe.model, s.scheme, method=s.method, out=artifact, overwrite=artifact.exists(),
                 method_params=s.params, overrides=s.overrides, ignore=s.ignore, quantize_head=s.quantize_head, seed=s.seed, calib=s.calib,
                 calib_samples=s.calib_samples, calib_seqlen=s.calib_seqlen, progress=progress, log=log)
        steps["quantize"] = "ran"
    else:
        steps["quantize"] = "reused"
    bench_spec_key = _key({"baseline": base["sha256"], "bench": asdict(recipe.budget.bench_spec("-"))})[:12]
    base_bench = run_dir / "baseline" / f"bench-{bench_spec_key}.json"
    eval_file, bench_file = folder / "eval.json", folder / "bench.json"

    def save(kind, obj):
        if kind == "eval":
            atomic_write_json(eval_file, obj.to_json())
        elif kind == "bench":
            atomic_write_json(base_bench, obj["baseline"].to_json())
            atomic_write_json(bench_file, obj["candidate"].to_json())

    log(f"[{rung.name}] gate")
    result = run_gate(recipe.model, str(artifact), recipe.budget,
                      eval_json=[eval_file] if eval_file.is_file() else [],
                      bench_json=[p for p in (base_bench, bench_file) if p.is_file()],
                      progress=progress, log=log, save_measured=save, always_scores=True)
    gate = result.to_json()
    atomic_write_json(folder / "gate.json", gate)
    steps.update({k: "ran" for k in result.ran})
    steps.update({k: "reused" for k in ("eval", "bench") if k not in result.ran and (folder / f"{k}.json").is_file()})
    manifest = json.loads((artifact / "quantship.json").read_text())
    record = {
        "name": rung.name, "key": key, "folder": str(folder), "artifact": str(artifact),
        "sha256": manifest["content_sha256"], "spec": rung.to_json()["spec"],
        "bits_per_weight": manifest["bits_per_weight"]["quantized_layers"],
        "model_bytes": manifest["model_bytes"], "passed": gate["passed"],
        "failed": [{"name": t["name"], "limit": t["limit"], "measured": t["measured"], "judged": _judged(t),
                    "reason": t["reason"]} for t in gate["terms"] if not t["passed"]],
        "steps": steps, "wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(folder / "rung.json", record)
    log(f"[{rung.name}] {'PASS' if record['passed'] else 'FAIL: ' + ', '.join(t['name'] for t in record['failed'])} "
        f"({', '.join(f'{k} {v}' for k, v in steps.items())}; {record['wall_s']:.1f} s)")
    return record


def _judged(term: dict):
    if term["measured"] is None:
        return None
    if term["judged_on"].startswith("upper bound") and term["ci95"]:
        return term["ci95"][1]
    return term["measured"]


def _artifact_ok(path: Path) -> bool:
    """A complete artifact (its files' hashes check); anything else is quantized again."""
    if not (path / "quantship.json").is_file():
        return False
    from ..artifact import ArtifactError, verify_artifact

    try:
        verify_artifact(path)
    except (ArtifactError, OSError, ValueError):
        return False
    return True
