"""Rich tables for `quantship bench` results (the dict run_bench returns)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from ..report import fmt_bytes

LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E"))


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _title(r: dict) -> str:
    model = r.get("model") or {}
    name = model.get("path", "model")
    scheme = model.get("scheme") or ("float" if model else "")
    spec = r.get("spec") or {}
    what = {"single": "single stream", "concurrency": f"concurrency {r.get('concurrency')}",
            "request_rate": f"Poisson {r.get('request_rate')} req/s"}.get(r.get("mode"), r.get("mode"))
    return f"{name} ({scheme}, KV {spec.get('kv', '?')}): {what}"


def summary_table(r: dict) -> Table:
    t = Table(title=_title(r), header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("cold load", f"{_num(r.get('load_s'), '{:.2f}')} s")]
    if r.get("mode") == "single":
        rows += [("prompt / output tokens", f"{r['prompt_tokens']} / {r['output_tokens']}"),
                 ("TTFT (median)", f"{_ms(r['ttft_s'])} ms"),
                 ("prefill", f"{_num(r['prefill_tok_s'])} tok/s"),
                 ("TPOT (median)", f"{_ms(r['tpot_s'])} ms"),
                 ("decode", f"{_num(r['decode_tok_s'])} tok/s")]
    else:
        rows += [("requests completed", f"{r['completed']} in {r['duration_s']:.2f} s"),
                 ("request throughput", f"{r['request_throughput']:.2f} req/s"),
                 ("output throughput", f"{r['output_tok_s']:.1f} tok/s"),
                 ("prefill (inside prefill steps)", f"{_num(r.get('prefill_tok_s'))} tok/s"),
                 ("mean decode batch", f"{r.get('mean_decode_batch', 0):.1f}")]
        if r.get("goodput") is not None:
            slo = ", ".join(f"{k}<={v * 1e3:g} ms" for k, v in r["slo"].items())
            rows.append((f"goodput ({slo})", f"{r['goodput']:.2f} req/s ({r['slo_attainment']:.0%} met)"))
    frac = r.get("bandwidth_fraction")
    rows += [("achieved bandwidth", f"{_num(r.get('bandwidth_gbs'))} GB/s"
              + (f" ({frac:.0%} of measured {r['measured_bandwidth_gbs']:.1f})" if frac else "")),
             ("weights read per step", fmt_bytes(r.get("weight_bytes") or 0)),
             ("peak RSS", fmt_bytes(r.get("peak_rss_bytes") or 0))]
    if r.get("cost_per_million_output_tokens") is not None:
        price = (r.get("spec") or {}).get("price_per_hour")
        rows.append((f"cost at ${price:g}/hour", f"${r['cost_per_million_output_tokens']:.3f} per 1M output tokens"))
    for row in rows:
        t.add_row(*row)
    return t


def latency_table(r: dict) -> Table:
    t = Table(title="latency (ms)", header_style="bold")
    for col in ("", "mean", "median", "p95", "p99"):
        t.add_column(col, justify="left" if not col else "right")
    for key, label in LATENCIES:
        s = r.get(key) or {}
        t.add_row(label, *(_ms(s.get(k)) for k in ("mean", "median", "p95", "p99")))
    return t


def render_bench(r: dict):
    """A renderable: the summary, plus the latency percentiles in the load modes."""
    if r.get("mode") == "single":
        return summary_table(r)
    return Group(summary_table(r), latency_table(r))
