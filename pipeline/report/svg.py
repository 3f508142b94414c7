"""Inline SVG charts: a line chart for training curves, grouped bars for Table IV. No plotting library,
nothing fetched: the markup lands in the page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    y_label: str,
    width: int = 480,
    height: int = 220,
    y_range: tuple[float, float] | None = None,
) -> str:
    """One polyline per named series of (x, y) points, with axes, ticks and a legend."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f'<p class="empty">{escape(title)}: no data</p>'
    left, right, top, bottom = 44, 136, 24, 34  # the legend sits right of the plot
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = y_range or (min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0)
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="15" class="title">{escape(title)}</text>',
    ]
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 4}" y="{py(t) + 3:.1f}" class="tick" text-anchor="end">{t:.2g}</text>'
        )
    for t in sorted({round(v) for v in _ticks(x0, x1)}):
        parts.append(
            f'<text x="{px(t):.1f}" y="{top + ph + 14}" class="tick" text-anchor="middle">{t}</text>'
        )
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="axis" text-anchor="middle">epoch</text>')
    parts.append(
        f'<text x="10" y="{top + ph / 2}" class="axis" text-anchor="middle" '
        f'transform="rotate(-90 10 {top + ph / 2})">{escape(y_label)}</text>'
    )
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        ly = top + 4 + 13 * k
        parts.append(f'<rect x="{left + pw + 10}" y="{ly}" width="10" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{left + pw + 24}" y="{ly + 5}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def bar_chart(
    groups: Mapping[str, Mapping[str, float]], title: str, width: int = 560, height: int = 260
) -> str:
    """Grouped bars in [0, 1]: one group per key of ``groups``, one bar per inner key, values labelled."""
    if not groups:
        return f'<p class="empty">{escape(title)}: no data</p>'
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    left, right, top, bottom = 40, 10, 40, 46
    pw, ph = width - left - right, height - top - bottom
    slot = pw / len(groups)
    bar = min(40.0, slot * 0.8 / len(names))
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="15" class="title">{escape(title)}</text>',
    ]
    for t in _ticks(0.0, 1.0):
        y = top + ph - t * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">{t:.0%}</text>')
    for k, name in enumerate(names):
        x = left + 110 * k
        parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>')
        parts.append(f'<text x="{x + 14}" y="33" class="legend">{escape(name)}</text>')
    for g, (group, values) in enumerate(groups.items()):
        start = left + g * slot + (slot - bar * len(names)) / 2
        for k, name in enumerate(names):
            if name not in values:
                continue
            v = max(0.0, min(1.0, float(values[name])))
            x, h = start + k * bar, v * ph
            parts.append(
                f'<rect x="{x:.1f}" y="{top + ph - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(group)}, {escape(name)}: '
                f"{v:.1%}</title></rect>"
            )
            parts.append(
                f'<text x="{x + bar / 2 - 1:.1f}" y="{top + ph - h - 3:.1f}" class="value" '
                f'text-anchor="middle">{100 * v:.0f}</text>'
            )
        parts.append(
            f'<text x="{left + g * slot + slot / 2:.1f}" y="{top + ph + 16}" class="tick" '
            f'text-anchor="middle">{escape(group)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)
