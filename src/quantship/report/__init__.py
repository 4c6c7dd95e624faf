"""Terminal tables (rich) for quantization and evaluation results."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

# Not a terminal (CI logs, pipes): rich would assume 80 columns and squeeze the tables.
console = Console(width=None if sys.stdout.isatty() else 160)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def eval_table(reports: list, title: str = "baseline vs candidates", *, baseline_size: bool = False) -> Table:
    """One row per EvalReport (its candidate's name, bpw, size); baseline_size: show the baseline's size."""
    table = Table(title=title, header_style="bold")
    for col in ("candidate", "bpw", "size", "ppl", "Δ ln ppl", "KLD mean", "KLD p99", "top-1", "RMS Δp"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    if reports:
        base = reports[0]
        base_bytes = base.baseline.size_bytes if baseline_size else None
        table.add_row("baseline (fp32)", "32", fmt_bytes(base_bytes) if base_bytes else "",
                      f"{base.ppl.baseline:.3f}", "", "", "", "", "")
    for rep in reports:
        cand = rep.candidate
        table.add_row(
            cand.name,
            f"{cand.bits_per_weight:.2f}" if cand.bits_per_weight is not None else "",
            fmt_bytes(cand.size_bytes) if cand.size_bytes else "",
            f"{rep.ppl.candidate:.3f}",
            f"{rep.ppl.ln_ratio:+.4f}",
            f"{rep.kld.mean:.5f}",
            f"{rep.kld.p99:.4f}",
            f"{rep.top1_agreement:.4f}",
            f"{rep.delta_p.rms:.4f}",
        )
    return table


def kld_table(report, name: str) -> Table:
    """The KL statistics of one EvalReport."""
    from dataclasses import asdict

    table = Table(title=f"{name}: KL divergence statistics ({report.tokens} scored tokens)", header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    ppl = report.ppl
    rows = [
        ("PPL baseline", f"{ppl.baseline:.4f}"),
        ("PPL candidate", f"{ppl.candidate:.4f}"),
        ("ln(PPL_cand/PPL_base)", f"{ppl.ln_ratio:+.5f} ± {ppl.ln_ratio_stderr:.5f}"),
    ]
    rows += [(f"KLD {k}", f"{v:.6f}") for k, v in asdict(report.kld).items()]
    rows.append(("same top token", f"{report.top1_agreement * 100:.2f} %"))
    rows.append(("ECE baseline / candidate", f"{report.ece.baseline:.4f} / {report.ece.candidate:.4f}"))
    rows += [(f"Δp {k}", f"{v * 100:+.3f} %") for k, v in asdict(report.delta_p).items()]
    for label, value in rows:
        table.add_row(label, value)
    return table


def quant_table(manifest: dict, path: str) -> Table:
    """One row per (layer kind, scheme): a kind whose layers got different schemes (per-layer
    overrides) has a row per scheme, with the bpw of its first layer of that scheme."""
    overrides = "".join(f", {p}={s}" for p, s in manifest.get("overrides") or [])
    method = manifest["method"]
    quantizer = method.get("params", {}).get("quantizer")
    title = f"{path}: {manifest['scheme']}{overrides} / {method['name']}" + (f" ({quantizer})" if quantizer else "")
    table = Table(title=title, header_style="bold")
    table.add_column("layers")
    table.add_column("scheme")
    table.add_column("bpw", justify="right")
    table.add_column("bytes", justify="right")
    groups: dict[tuple[str, str], list] = {}
    for name, info in manifest["modules"].items():
        key = name.split(".")[-1] if "." in name else name
        groups.setdefault((key, info["scheme"]), []).append(info)
    for (key, scheme), infos in groups.items():
        table.add_row(f"{key} x{len(infos)}", scheme, f"{infos[0]['bits_per_weight']:.3f}",
                      fmt_bytes(sum(i["storage_bytes"] for i in infos)))
    bpw = manifest["bits_per_weight"]
    table.add_row("[bold]quantized layers[/]", "", f"{bpw['quantized_layers']:.3f}", "")
    table.add_row("[bold]whole model[/]", "", f"{bpw['whole_model']:.3f}", fmt_bytes(manifest["model_bytes"]))
    return table
