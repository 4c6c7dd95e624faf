"""The gate's terminal table: term, budget, measured (with its 95% CI), verdict."""

from __future__ import annotations

from rich.table import Table

from .budget import AT_LEAST


def fmt_value(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def limit_text(term) -> str:
    base = term.name.split(".")[0]
    if base == "no_significant_regression":
        return "no significant drop"
    at_least = base in AT_LEAST or term.name.endswith("top1_agreement")
    return f"{'>=' if at_least else '<='} {term.limit:g}"


def gate_table(decision, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    for col in ("term", "budget", "measured", "95% CI", "verdict"):
        table.add_column(col, justify="left" if col in ("term", "verdict") else "right")
    for term in decision.terms:
        ci = f"[{fmt_value(term.ci95[0])}, {fmt_value(term.ci95[1])}]" if term.ci95 else ""
        verdict = "[green]pass[/]" if term.passed else f"[red]FAIL[/] {term.reason}"
        table.add_row(term.name, limit_text(term), fmt_value(term.measured), ci, verdict)
    return table
