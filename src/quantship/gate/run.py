"""`quantship gate`: gather the measurements a budget needs (reusing given eval/bench JSON when it
is for these models and data), run only what is missing, and decide.

    result = run_gate("smollm2-135m", "out/w8", load_budget("budget.yaml"), eval_json=["eval.json"])
    result.decision.passed, result.to_json()

Anything that keeps the gate from deciding (a bad budget, a report for other models or data, a model
that does not load) raises GateError: the CLI's exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .budget import Budget
from .decide import Decision, Evidence, decide


class GateError(RuntimeError):
    """The gate cannot decide (exit 2)."""


@dataclass(frozen=True)
class GateResult:
    decision: Decision
    budget: Budget
    baseline: dict  # {name, path, sha256}
    candidate: dict
    eval_data_sha256: str | None
    tasks_sha256: str | None
    eval_settings: dict | None
    evidence: Evidence
    reused: dict[str, str]  # what came from given JSON files
    ran: tuple[str, ...]  # what this call measured

    def to_json(self) -> dict:
        from .. import __version__
        from ..fsutil import canonical_json, sha256_bytes

        budget = self.budget.to_json()
        return {**self.decision.to_json(), "models": {"baseline": self.baseline, "candidate": self.candidate},
                "eval_data_sha256": self.eval_data_sha256, "tasks_sha256": self.tasks_sha256,
                "eval_settings": self.eval_settings, "bench_settings": _bench_settings(self.evidence),
                "budget": budget, "budget_sha256": sha256_bytes(canonical_json(budget).encode()),
                "quantship_version": __version__, "reused": self.reused, "ran": list(self.ran)}


def _bench_settings(evidence: Evidence) -> dict | None:
    bench = evidence.bench_candidate or evidence.bench_baseline
    if bench is None:
        return None
    spec = asdict(bench.spec)
    spec.pop("model")
    return spec


def model_identity(model: str, log=print) -> dict:
    """{name, path, sha256} of a built-in name, model folder or artifact (models/digest.py)."""
    from ..models.digest import folder_sha256
    from ..models.load import resolve_model

    try:
        path = resolve_model(model, log=log)
        sha256, kind = folder_sha256(path)
    except (OSError, ValueError, KeyError) as e:
        raise GateError(f"cannot use model {model!r}: {e}") from e
    return {"name": str(model), "path": str(path), "sha256": sha256, "digest": kind}


def expected_data_sha256(spec) -> str:
    """The eval data hash a report measured with `spec` must carry (texts and window settings)."""
    from ..evaluate.compare import eval_data_sha256, load_texts

    return eval_data_sha256(load_texts(spec.texts), spec)


def _read_json(path: str | Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise GateError(f"{what} {path} is not readable JSON: {e}") from None


def find_eval_report(paths, baseline: dict, candidate: dict, data_sha256: str | None):
    """The report among the files' reports for these two models (and data): -> EvalReport or None
    when no file is given; GateError naming the mismatch when files are given but none fits."""
    from ..evaluate.results import reports_from_json

    if not paths:
        return None
    seen = []
    for path in paths:
        try:
            reports = reports_from_json(_read_json(path, "--eval-json"))
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"--eval-json {path} is not a quantship eval report: {e}") from None
        for r in reports:
            if r.matches(baseline["sha256"], candidate["sha256"]):
                if data_sha256 is not None and r.data_sha256 != data_sha256:
                    raise GateError(
                        f"--eval-json {path} measured other evaluation data (data sha256 {r.data_sha256[:12]}…, "
                        f"texts {', '.join(r.settings.texts)}, ctx {r.settings.ctx}, max_windows "
                        f"{r.settings.max_windows}) than the gate's settings ({data_sha256[:12]}…); pass the same "
                        f"--text/--ctx/--max-windows or drop --eval-json")
                return r
            seen.append(f"{r.baseline.name} ({(r.baseline.sha256 or '?')[:12]}…) vs {r.candidate.name} "
                        f"({(r.candidate.sha256 or '?')[:12]}…)")
    raise GateError(f"--eval-json has no report for baseline {baseline['sha256'][:12]}… and candidate "
                    f"{candidate['sha256'][:12]}… (it holds: {'; '.join(seen)})")


def find_bench_reports(paths, baseline: dict, candidate: dict) -> dict:
    """{"baseline": BenchReport, "candidate": BenchReport} from `quantship bench --json` files or the
    gate's own {"baseline": ..., "candidate": ...} file, matched by the models' sha256."""
    from ..bench.results import BenchReport

    found: dict = {}
    for path in paths or ():
        data = _read_json(path, "--bench-json")
        items = [data[k] for k in ("baseline", "candidate") if k in data] if "mode" not in data else [data]
        for item in items:
            try:
                report = BenchReport.from_json(item)
            except (KeyError, TypeError, ValueError) as e:
                raise GateError(f"--bench-json {path} is not a quantship bench report: {e}") from None
            sha = report.model.sha256
            role = "baseline" if sha == baseline["sha256"] else "candidate" if sha == candidate["sha256"] else None
            if role is None:
                raise GateError(f"--bench-json {path} measured {report.model.path} (sha256 {(sha or '?')[:12]}…), "
                                f"neither the baseline ({baseline['sha256'][:12]}…) nor the candidate "
                                f"({candidate['sha256'][:12]}…)")
            found[role] = report
    if len(found) == 2:
        a, b = ({**asdict(found[k].spec), "model": None} for k in ("baseline", "candidate"))
        if a != b:
            raise GateError("--bench-json: the baseline and candidate were benchmarked with different settings "
                            f"({_diff(a, b)}); latency and memory compare only side by side")
    return found


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))


def bench_in_subprocess(spec, *, timeout: float = 1800):
    """One BenchReport measured in a fresh process, so peak RSS is this model's alone."""
    from ..bench.results import BenchReport

    with tempfile.TemporaryDirectory(prefix="quantship-bench.") as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "quantship.gate.run", json.dumps(asdict(spec)), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GateError(f"bench of {spec.model} failed: {tail[0]}")
        return BenchReport.from_json(json.loads(out.read_text()))


def run_gate(baseline: str, candidate: str, budget: Budget, *, eval_json=(), bench_json=(), eval_overrides=None,
             progress: bool = True, log=print, save_measured=None, always_scores: bool = False) -> GateResult:
    """Measure what the budget needs (reusing the given JSON files) and decide.

    save_measured(kind, obj): called with ("eval", EvalReport) / ("bench", {"baseline", "candidate"})
    for what this call measured, so a caller (the release ladder) can keep it. always_scores: run the
    perplexity / KLD evaluation even when no term needs it (the release report plots it)."""
    if budget.empty:
        raise GateError("the budget has no terms; nothing to decide (see `quantship budget init`)")
    base = model_identity(baseline, log=log)
    cand = model_identity(candidate, log=log)
    if base["sha256"] == cand["sha256"]:
        log("note: the baseline and the candidate are the same model")
    try:
        spec = budget.eval_spec(**(eval_overrides or {}))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise GateError(f"evaluation settings: {e}") from e
    needs_scores, needs_tasks = budget.needs_scores or always_scores, bool(budget.needed_suites)
    data_sha = expected_data_sha256(spec) if needs_scores else None
    reused, ran, missing = {}, [], {}
    report = find_eval_report(eval_json, base, cand, data_sha) if (needs_scores or needs_tasks) else None
    scores = report if (report is not None and needs_scores) else None
    tasks = report.tasks if report is not None and report.tasks is not None and needs_tasks else None
    if scores is not None:
        reused["scores"] = report.candidate.name
    missing_suites = [s for s in spec.suite_names if tasks is None or s not in tasks.suites]
    if tasks is not None:
        reused["tasks"] = ", ".join(tasks.suites)
    if (needs_scores and scores is None) or (needs_tasks and missing_suites and spec.runs_tasks):
        scores, tasks = _run_eval(baseline, candidate, spec, scores, tasks, missing_suites, needs_scores,
                                  progress=progress, log=log, save=save_measured)
        ran.append("eval")
    if needs_tasks and not spec.runs_tasks:
        missing["tasks"] = "the budget names no built-in suite and no suite file was given (eval.suite_files)"
    bench = {}
    if budget.needs_bench:
        bench = find_bench_reports(bench_json, base, cand)
        if bench:
            reused["bench"] = ", ".join(sorted(bench))
        todo = [role for role in ("baseline", "candidate") if role not in bench]
        for role in todo:
            model = baseline if role == "baseline" else candidate
            log(f"bench {role}: {model}")
            spec_b = budget.bench_spec(model) if not bench else replace(next(iter(bench.values())).spec, model=str(model))
            bench[role] = bench_in_subprocess(spec_b)
        if todo:
            ran.append("bench")
            if save_measured is not None:
                save_measured("bench", dict(bench))
    evidence = Evidence(scores=scores, tasks=tasks, bench_baseline=bench.get("baseline"),
                        bench_candidate=bench.get("candidate"), missing=missing)
    decision = decide(budget, evidence)
    settings = scores.settings.to_json() if scores is not None else None
    return GateResult(decision=decision, budget=budget, baseline=base, candidate=cand,
                      eval_data_sha256=scores.data_sha256 if scores is not None else None,
                      tasks_sha256=tasks.content_sha256 if tasks is not None else None, eval_settings=settings,
                      evidence=evidence, reused=reused, ran=tuple(ran))


def _run_eval(baseline, candidate, spec, scores, tasks, missing_suites, needs_scores, *, progress, log, save):
    """Run the scores (if missing) and the missing suites; -> (scores, tasks)."""
    from ..evaluate.results import TaskResults
    from ..evaluate.run import evaluate_models, run_tasks
    from ..models.load import load_model, resolve_model

    if needs_scores and scores is None:
        report = evaluate_models(baseline, [candidate], replace(spec, suites=tuple(missing_suites),
                                                                 suite_files=spec.suite_files if tasks is None else ()),
                                 progress=progress, log=log)[0]
        if save is not None:
            save("eval", report)
        new_tasks = report.tasks
        scores = report
    else:
        base = load_model(resolve_model(baseline, log=log), log=log)
        cand = load_model(resolve_model(candidate, log=log), log=log)
        new_tasks = run_tasks(base, cand, replace(spec, suites=tuple(missing_suites),
                                                  suite_files=spec.suite_files if tasks is None else ()))
        if save is not None:
            save("tasks", new_tasks)
    if new_tasks is not None:
        merged = {**(tasks.as_dict() if tasks is not None else {}), **new_tasks.as_dict()}
        tasks = TaskResults.from_suites(merged)
    return scores, tasks


def _bench_main(argv: list[str]) -> int:
    """python -m quantship.gate.run SPEC_JSON OUT_JSON: one bench in this process."""
    from ..bench.run import run_bench
    from ..fsutil import atomic_write_json
    from ..specs import BenchSpec

    spec = BenchSpec(**json.loads(argv[0]))
    atomic_write_json(argv[1], run_bench(spec, progress=False).to_json())
    return 0


if __name__ == "__main__":
    sys.exit(_bench_main(sys.argv[1:]))
