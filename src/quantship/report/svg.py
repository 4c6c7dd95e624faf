"""Hand-written SVG charts (no dependencies, no network): scatter with a front line, horizontal
intervals, grouped bars, strip plots. Each function returns one <svg> element as a string."""

from __future__ import annotations

import math
from html import escape

W, H = 640, 320
PAD_L, PAD_R, PAD_T, PAD_B = 70, 20, 30, 50
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + step * 1e-9]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.1e}"


class Frame:
    """Linear axes over [x0, x1] x [y0, y1] in a W x H box."""

    def __init__(self, x0, x1, y0, y1, *, width=W, height=H):
        self.w, self.h = width, height
        pad_x, pad_y = (x1 - x0) * 0.05 or 1.0, (y1 - y0) * 0.08 or (abs(y1) or 1.0) * 0.1
        self.x0, self.x1, self.y0, self.y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def x(self, v):
        return PAD_L + (v - self.x0) / (self.x1 - self.x0) * (self.w - PAD_L - PAD_R)

    def y(self, v):
        return self.h - PAD_B - (v - self.y0) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)

    def axes(self, title: str, xlabel: str, ylabel: str, *, xticks=True) -> list[str]:
        out = [f'<rect x="0" y="0" width="{self.w}" height="{self.h}" fill="#fff"/>',
               f'<text x="{self.w / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
               f'<line x1="{PAD_L}" y1="{self.h - PAD_B}" x2="{self.w - PAD_R}" y2="{self.h - PAD_B}" stroke="#333"/>',
               f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{self.h - PAD_B}" stroke="#333"/>',
               f'<text x="{self.w / 2}" y="{self.h - 10}" text-anchor="middle">{escape(xlabel)}</text>',
               f'<text x="14" y="{self.h / 2}" text-anchor="middle" transform="rotate(-90 14 {self.h / 2})">'
               f'{escape(ylabel)}</text>']
        for t in _ticks(self.y0, self.y1):
            if self.y0 <= t <= self.y1:
                y = self.y(t)
                out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{self.w - PAD_R}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        if xticks:
            for t in _ticks(self.x0, self.x1):
                if self.x0 <= t <= self.x1:
                    x = self.x(t)
                    out.append(f'<line x1="{x:.1f}" y1="{self.h - PAD_B}" x2="{x:.1f}" y2="{self.h - PAD_B + 4}" '
                               f'stroke="#333"/>')
                    out.append(f'<text x="{x:.1f}" y="{self.h - PAD_B + 16}" text-anchor="middle">{_fmt(t)}</text>')
        return out


def _svg(parts: list[str], width=W, height=H, label="") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="sans-serif" font-size="11" role="img" aria-label="{escape(label)}">' + "".join(parts)
            + "</svg>")


def pareto_chart(points: list[dict], title: str, xlabel: str, ylabel: str, *, limit: float | None = None) -> str:
    """points: {label, x, y, chosen: bool, passed: bool}; the lower-left front is drawn as a line,
    an optional y limit (the budget's) as a dashed red line."""
    pts = [p for p in points if p["x"] is not None and p["y"] is not None]
    if not pts:
        return ""
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    f = Frame(min(xs), max(xs), min(0.0, min(ys)), max(ys + ([limit] if limit is not None else [])))
    out = f.axes(title, xlabel, ylabel)
    if limit is not None:
        out.append(f'<line x1="{PAD_L}" y1="{f.y(limit):.1f}" x2="{W - PAD_R}" y2="{f.y(limit):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="6 3"/><text x="{PAD_L + 4}" y="{f.y(limit) - 4:.1f}" fill="#d62728">budget '
                   f'{_fmt(limit)}</text>')
    front, best = [], math.inf
    for p in sorted(pts, key=lambda p: (p["x"], p["y"])):
        if p["y"] < best:
            front.append(p)
            best = p["y"]
    if len(front) > 1:
        path = " ".join(f"{f.x(p['x']):.1f},{f.y(p['y']):.1f}" for p in front)
        out.append(f'<polyline points="{path}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    for p in pts:
        x, y = f.x(p["x"]), f.y(p["y"])
        color = "#2ca02c" if p.get("passed") else "#d62728"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"><title>{escape(p["label"])}: '
                   f'{_fmt(p["x"])}, {_fmt(p["y"])}</title></circle>')
        if p.get("chosen"):
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="#000" stroke-width="2"/>')
        right = x > W - 200  # labels of points near the right edge go to their left
        out.append(f'<text x="{x - 12 if right else x + 8:.1f}" y="{y - 8:.1f}" text-anchor="{"end" if right else "start"}">'
                   f'{escape(p["label"])}{" (chosen)" if p.get("chosen") else ""}</text>')
    out.append(f'<text x="{W - PAD_R}" y="{PAD_T + 10}" text-anchor="end" fill="#555">green: passed the gate, '
               f'red: failed; ring: chosen</text>')
    return _svg(out, label=title)


def interval_chart(rows: list[dict], title: str, xlabel: str, *, limit: float | None = None) -> str:
    """rows: {label, value, lo, hi}; horizontal CI bars, one row each; optional vertical limit line."""
    if not rows:
        return ""
    height = PAD_T + PAD_B + 26 * len(rows)
    vals = [v for r in rows for v in (r["lo"], r["hi"], r["value"]) if v is not None] + ([limit] if limit is not None else [])
    vals.append(0.0)
    f = Frame(min(vals), max(vals), 0, len(rows), height=height)
    f.y0, f.y1 = 0, len(rows)
    out = [f'<rect x="0" y="0" width="{W}" height="{height}" fill="#fff"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<text x="{W / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<line x1="{PAD_L}" y1="{height - PAD_B}" x2="{W - PAD_R}" y2="{height - PAD_B}" stroke="#333"/>']
    for t in _ticks(f.x0, f.x1):
        if f.x0 <= t <= f.x1:
            out.append(f'<text x="{f.x(t):.1f}" y="{height - PAD_B + 16}" text-anchor="middle">{_fmt(t)}</text>')
            out.append(f'<line x1="{f.x(t):.1f}" y1="{PAD_T}" x2="{f.x(t):.1f}" y2="{height - PAD_B}" stroke="#eee"/>')
    out.append(f'<line x1="{f.x(0):.1f}" y1="{PAD_T}" x2="{f.x(0):.1f}" y2="{height - PAD_B}" stroke="#333"/>')
    if limit is not None:
        out.append(f'<line x1="{f.x(limit):.1f}" y1="{PAD_T}" x2="{f.x(limit):.1f}" y2="{height - PAD_B}" '
                   f'stroke="#d62728" stroke-dasharray="5 3"><title>limit {_fmt(limit)}</title></line>')
    for i, r in enumerate(rows):
        y = PAD_T + 26 * i + 13
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4}" text-anchor="end">{escape(r["label"])}</text>')
        if r["lo"] is not None and r["hi"] is not None:
            out.append(f'<line x1="{f.x(r["lo"]):.1f}" y1="{y}" x2="{f.x(r["hi"]):.1f}" y2="{y}" stroke="#1f77b4" '
                       f'stroke-width="3"/>')
        out.append(f'<circle cx="{f.x(r["value"]):.1f}" cy="{y}" r="4" fill="#1f77b4"><title>{escape(r["label"])}: '
                   f'{_fmt(r["value"])} [{_fmt(r["lo"] or 0)}, {_fmt(r["hi"] or 0)}]</title></circle>')
    return _svg(out, height=height, label=title)


def bar_chart(groups: list[str], series: dict[str, list[float | None]], title: str, ylabel: str) -> str:
    """Grouped bars: groups on x, one bar per series in each group."""
    vals = [v for vs in series.values() for v in vs if v is not None]
    if not groups or not vals:
        return ""
    f = Frame(0, len(groups), 0, max(vals))
    f.x0, f.x1, f.y0 = 0, len(groups), 0
    out = f.axes(title, "", ylabel, xticks=False)
    n = max(len(series), 1)
    slot = (W - PAD_L - PAD_R) / len(groups)
    bw = slot * 0.8 / n
    for gi, g in enumerate(groups):
        out.append(f'<text x="{PAD_L + slot * (gi + 0.5):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{escape(g)}</text>')
        for si, (name, vs) in enumerate(series.items()):
            v = vs[gi]
            if v is None:
                continue
            x = PAD_L + slot * gi + slot * 0.1 + bw * si
            out.append(f'<rect x="{x:.1f}" y="{f.y(v):.1f}" width="{bw:.1f}" height="{f.y(0) - f.y(v):.1f}" '
                       f'fill="{PALETTE[si % len(PALETTE)]}"><title>{escape(name)} / {escape(g)}: {_fmt(v)}</title></rect>')
    for si, name in enumerate(series):
        out.append(f'<rect x="{PAD_L + 10 + 120 * si}" y="{PAD_T - 2}" width="10" height="10" '
                   f'fill="{PALETTE[si % len(PALETTE)]}"/><text x="{PAD_L + 24 + 120 * si}" y="{PAD_T + 7}">'
                   f'{escape(name)}</text>')
    return _svg(out, label=title)


def strip_chart(series: dict[str, list[float]], title: str, ylabel: str) -> str:
    """Each series' values as dots in its own column, with its median as a bar (latency runs)."""
    vals = [v for vs in series.values() for v in vs]
    if not vals:
        return ""
    f = Frame(0, len(series), 0, max(vals))
    f.x0, f.x1, f.y0 = 0, len(series), 0
    out = f.axes(title, "", ylabel, xticks=False)
    slot = (W - PAD_L - PAD_R) / len(series)
    for i, (name, vs) in enumerate(series.items()):
        cx = PAD_L + slot * (i + 0.5)
        out.append(f'<text x="{cx:.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{escape(name)}</text>')
        for j, v in enumerate(vs):
            dx = (j % 7 - 3) * 4
            out.append(f'<circle cx="{cx + dx:.1f}" cy="{f.y(v):.1f}" r="3.5" fill="{PALETTE[i % len(PALETTE)]}" '
                       f'fill-opacity="0.7"><title>{_fmt(v)}</title></circle>')
        if vs:
            med = sorted(vs)[len(vs) // 2]
            out.append(f'<line x1="{cx - slot * 0.3:.1f}" y1="{f.y(med):.1f}" x2="{cx + slot * 0.3:.1f}" '
                       f'y2="{f.y(med):.1f}" stroke="#000" stroke-width="2"><title>median {_fmt(med)}</title></line>')
    return _svg(out, label=title)
