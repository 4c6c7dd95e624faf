"""`quantship report RUN_DIR`: a release run as one self-contained HTML page (inline SVG charts, no
scripts or styles from the network) and a short markdown summary for a pull-request comment.

Reads RUN_DIR/decision.json and each rung's rung.json, eval.json, bench.json and gate.json, plus the
baseline's bench in RUN_DIR/baseline/."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from . import fmt_bytes
from .svg import bar_chart, interval_chart, pareto_chart, strip_chart


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    decision = _read(run_dir / "decision.json")
    if decision is None:
        raise FileNotFoundError(f"{run_dir} has no decision.json: is it a `quantship release` run folder?")
    rungs = []
    for record in decision["rungs"]:
        folder = Path(record["folder"])
        if not folder.is_dir():  # the run folder was moved: rungs/ beside decision.json
            folder = run_dir / "rungs" / folder.name
        rungs.append({**record, "eval": _read(folder / "eval.json"), "bench": _read(folder / "bench.json"),
                      "gate": _read(folder / "gate.json")})
    baseline_bench = None
    for path in sorted((run_dir / "baseline").glob("bench-*.json")):
        baseline_bench = _read(path)
    return {"decision": decision, "rungs": rungs, "baseline_bench": baseline_bench}


def _kld(rung) -> float | None:
    return rung["eval"]["kld"]["mean"] if rung.get("eval") else None


def _chosen_name(run) -> str | None:
    chosen = run["decision"]["chosen"]
    return chosen["name"] if chosen else None


def charts(run: dict) -> list[tuple[str, str]]:
    """(heading, svg) pairs for every chart the run has data for."""
    rungs, chosen = run["rungs"], _chosen_name(run)
    out = []
    pts = [{"label": r["name"], "x": r["bits_per_weight"], "y": _kld(r), "chosen": r["name"] == chosen,
            "passed": r["passed"]} for r in rungs]
    limit = run["decision"]["budget"].get("kld_mean")
    out.append(("Pareto front: bits per weight vs KLD",
                pareto_chart(pts, "bits per weight (quantized layers) vs mean KLD", "bits per weight", "KLD mean",
                             limit=limit)))
    pts_mem = [{**p, "x": r["model_bytes"] / 2**20} for p, r in zip(pts, rungs)]
    out.append(("Pareto front: model size vs KLD",
                pareto_chart(pts_mem, "model size vs mean KLD", "model bytes (MiB)", "KLD mean", limit=limit)))
    rows = []
    for r in rungs:
        tasks = (r["eval"] or {}).get("tasks") or {}
        for suite, res in tasks.items():
            if isinstance(res, dict) and "ci95" in res:
                rows.append({"label": f"{r['name']} / {suite}", "value": 100 * res["delta"],
                             "lo": 100 * res["ci95"][0], "hi": 100 * res["ci95"][1]})
    if rows:
        out.append(("Per-suite accuracy deltas (candidate - baseline, points, paired 95% CI)",
                    interval_chart(rows, "accuracy delta per suite (points)", "delta (points), 95% CI")))
    texts = sorted({t for r in rungs for t in ((r["eval"] or {}).get("texts") or {})})
    if texts:
        series = {r["name"]: [((r["eval"] or {}).get("texts") or {}).get(t, {}).get("kld", {}).get("mean")
                              for t in texts] for r in rungs}
        out.append(("Per-slice KLD", bar_chart(texts, series, "mean KLD per evaluation text", "KLD mean")))
    base = run["baseline_bench"]
    for r in rungs:
        if r.get("bench") and base and base.get("mode") == "single" and r["bench"].get("mode") == "single":
            for key, label in (("ttft_runs_s", "TTFT"), ("tpot_runs_s", "TPOT")):
                series = {"baseline": [v * 1000 for v in base[key]], r["name"]: [v * 1000 for v in r["bench"][key]]}
                out.append((f"{label} runs: baseline vs {r['name']}",
                            strip_chart(series, f"{label} per timed run (ms)", f"{label} (ms)")))
    return [(h, s) for h, s in out if s]


def _gate_html(rung: dict) -> str:
    gate = rung.get("gate")
    if not gate:
        return "<p>no gate result</p>"
    rows = []
    for t in gate["terms"]:
        ci = f"[{t['ci95'][0]:.4g}, {t['ci95'][1]:.4g}]" if t.get("ci95") else ""
        measured = "—" if t["measured"] is None else f"{t['measured']:.4g}"
        verdict = "pass" if t["passed"] else "FAIL"
        rows.append(f"<tr class=\"{verdict.lower()}\"><td>{escape(t['name'])}</td><td>{t['limit']:g}</td>"
                    f"<td>{measured}</td><td>{ci}</td><td>{verdict}</td><td>{escape(t['reason'])}</td></tr>")
    return ("<table><tr><th>term</th><th>budget</th><th>measured</th><th>95% CI</th><th>verdict</th><th>reason</th>"
            "</tr>" + "".join(rows) + "</table>")


STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
tr.fail td{background:#fde8e8}tr.pass td{background:#eaf7ea}.chosen{font-weight:bold}
figure{margin:1em 0}figcaption{font-weight:bold;margin-bottom:4px}"""


def render_html(run: dict) -> str:
    d = run["decision"]
    chosen = d["chosen"]
    head = (f"<p class=\"chosen\">Chosen: {escape(chosen['name'])} ({escape(chosen['artifact'])}, "
            f"{chosen['bits_per_weight']} bpw, {fmt_bytes(chosen['model_bytes'])})</p>" if chosen else
            f"<p class=\"chosen\">No rung holds the budget; closest miss: {escape(d['closest_miss']['name'])}</p>")
    rung_rows = "".join(
        f"<tr class=\"{'pass' if r['passed'] else 'fail'}\"><td>{escape(r['name'])}</td><td>{r['bits_per_weight']}</td>"
        f"<td>{fmt_bytes(r['model_bytes'])}</td><td>{'' if _kld(r) is None else f'{_kld(r):.5f}'}</td>"
        f"<td>{'pass' if r['passed'] else 'FAIL'}</td><td>{escape(', '.join(t['name'] for t in r['failed']))}</td></tr>"
        for r in run["rungs"])
    parts = [f"<h1>quantship release: {escape(str(d['model']['name']))}</h1>", head,
             f"<p>{escape(d['why'])}. Not tried: {escape(', '.join(d['not_tried']) or 'none')}.</p>",
             "".join(f"<p>{escape(n)}</p>" for n in d.get("notes", [])),
             "<h2>Rungs</h2><table><tr><th>rung</th><th>bpw</th><th>size</th><th>KLD mean</th><th>gate</th>"
             "<th>failed terms</th></tr>" + rung_rows + "</table>"]
    for heading, svg in charts(run):
        parts.append(f"<figure><figcaption>{escape(heading)}</figcaption>{svg}</figure>")
    for r in run["rungs"]:
        parts.append(f"<h2>Gate: {escape(r['name'])}</h2>" + _gate_html(r))
    parts.append(f"<p>Model sha256 {escape(d['model']['sha256'])}.</p>")
    script = ("<script>document.addEventListener('DOMContentLoaded',function(){"
              "document.body.setAttribute('data-charts',document.querySelectorAll('svg').length);});</script>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>quantship release report</title>"
            f"<style>{STYLE}</style>{script}</head><body>" + "\n".join(parts) + "</body></html>\n")


def render_markdown(run: dict) -> str:
    d = run["decision"]
    chosen = d["chosen"]
    lines = ["## quantship release: " + str(d["model"]["name"]), ""]
    if chosen:
        lines.append(f"**Chosen: {chosen['name']}** ({chosen['bits_per_weight']} bpw, "
                     f"{fmt_bytes(chosen['model_bytes'])}) — {d['why']}.")
    else:
        miss = d["closest_miss"]
        lines.append(f"**No rung holds the budget.** Closest miss: {miss['name']} "
                     f"(failed: {', '.join(t['name'] for t in miss['failed'])}).")
    lines += ["", "| rung | bpw | size | KLD mean | gate | failed terms |", "|---|---:|---:|---:|---|---|"]
    for r in run["rungs"]:
        kld = "" if _kld(r) is None else f"{_kld(r):.5f}"
        failed = "; ".join(f"{t['name']} ({t['reason']})" for t in r["failed"])
        lines.append(f"| {r['name']} | {r['bits_per_weight']} | {fmt_bytes(r['model_bytes'])} | {kld} | "
                     f"{'pass' if r['passed'] else 'FAIL'} | {failed} |")
    if d["not_tried"]:
        lines += ["", f"Not tried (a preferred rung passed first): {', '.join(d['not_tried'])}."]
    for n in d.get("notes", []):
        lines += ["", n]
    return "\n".join(lines) + "\n"


def write_reports(run_dir: str | Path, html_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html (or html_path) and report.md beside it; -> both paths."""
    from ..fsutil import atomic_write_text

    run = load_run(run_dir)
    html_path = Path(html_path) if html_path else Path(run_dir) / "report.html"
    md_path = html_path.with_suffix(".md")
    atomic_write_text(html_path, render_html(run))
    atomic_write_text(md_path, render_markdown(run))
    return html_path, md_path
