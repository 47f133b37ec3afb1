"""Line charts as inline SVG, made in Python: the report's plots need no JavaScript, CSS file or network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float | None]]  # None leaves a gap
    color: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class Chart:
    title: str
    y_label: str
    series: Sequence[Series]
    x_label: str = "seconds"
    shade: Sequence[tuple[float, float, str]] = field(default_factory=tuple)  # (x0, x1, label), e.g. the warm-up
    y_min: float | None = 0.0
    width: int = 760
    height: int = 260


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def render(chart: Chart) -> str:
    """The chart as an ``<svg>`` element (one ``<path class="series">`` per series with data)."""
    left, right, top, bottom = 64, 16, 28, 40
    w, h = chart.width, chart.height
    pw, ph = w - left - right, h - top - bottom
    xs = [x for s in chart.series for x, y in s.points if y is not None and math.isfinite(y)]
    ys = [y for s in chart.series for _, y in s.points if y is not None and math.isfinite(y)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'role="img" aria-label="{escape(chart.title)}">',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
        f'<text x="{left}" y="18" font-family="sans-serif" font-size="14" font-weight="bold">'
        f"{escape(chart.title)}</text>",
    ]
    if not xs:
        parts.append(
            f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-family="sans-serif" font-size="13" '
            f'fill="#666">no data</text></svg>'
        )
        return "".join(parts)
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0: float = chart.y_min if chart.y_min is not None else min(ys)
    y1 = max(ys)
    if y1 <= y0:
        y1 = y0 + (abs(y0) or 1.0)
    step = _nice_step(y1 - y0)
    y1 = math.ceil(y1 / step) * step

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (min(max(y, y0), y1) - y0) / (y1 - y0) * ph

    for a, b, label in chart.shade:
        a, b = max(a, x0), min(b, x1)
        if b > a:
            parts.append(
                f'<rect x="{px(a):.1f}" y="{top}" width="{px(b) - px(a):.1f}" height="{ph}" fill="#eeeeee"/>'
                f'<text x="{px(a) + 4:.1f}" y="{top + 12}" font-family="sans-serif" font-size="10" '
                f'fill="#777">{escape(label)}</text>'
            )
    tick = y0
    while tick <= y1 + step / 2:
        y = py(tick)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#dddddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-family="sans-serif" '
            f'font-size="10">{_fmt(tick)}</text>'
        )
        tick += step
    xstep = _nice_step(x1 - x0, 8)
    tick = math.ceil(x0 / xstep) * xstep
    while tick <= x1:
        parts.append(
            f'<text x="{px(tick):.1f}" y="{top + ph + 14}" text-anchor="middle" font-family="sans-serif" '
            f'font-size="10">{_fmt(tick)}</text>'
        )
        tick += xstep
    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888888"/>'
        f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle" font-family="sans-serif" '
        f'font-size="11">{escape(chart.x_label)}</text>'
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-family="sans-serif" font-size="11" '
        f'transform="rotate(-90 14 {top + ph / 2})">{escape(chart.y_label)}</text>'
    )
    legend_x = left + pw
    for i, s in enumerate(chart.series):
        color = s.color or PALETTE[i % len(PALETTE)]
        d: list[str] = []
        pen_up = True
        for x, yv in s.points:
            if yv is None or not math.isfinite(yv):
                pen_up = True
                continue
            d.append(f"{'M' if pen_up else 'L'}{px(x):.1f},{py(yv):.1f}")
            pen_up = False
        if d:
            dash = ' stroke-dasharray="6,4"' if s.dashed else ""
            parts.append(
                f'<path class="series" data-label="{escape(s.label)}" d="{" ".join(d)}" fill="none" '
                f'stroke="{color}" stroke-width="2"{dash}/>'
            )
        legend_x -= 8 + 7 * len(s.label) + 16
        parts.append(
            f'<rect x="{legend_x:.0f}" y="9" width="12" height="4" fill="{color}"/>'
            f'<text x="{legend_x + 16:.0f}" y="15" font-family="sans-serif" font-size="11">{escape(s.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
