"""Inline SVG charts, drawn on the server: no JavaScript, no build step, nothing fetched by the browser.

Values are exact decimals; coordinates are computed with ``Decimal`` too and printed with one decimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 220
PAD_LEFT, PAD_BOTTOM, PAD_TOP = 64, 28, 12


def _n(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def bar_chart(points: Sequence[tuple[str, Decimal]], *, title: str, unit: str, test_id: str) -> Markup:
    """Bars for (label, value) points; negative values are drawn as zero (give-backs net out per day)."""
    plot_w = Decimal(WIDTH - PAD_LEFT - 8)
    plot_h = Decimal(HEIGHT - PAD_BOTTOM - PAD_TOP)
    peak = max((v for _, v in points), default=Decimal(0))
    peak = peak if peak > 0 else Decimal(1)
    parts = [(f'<svg role="img" aria-label="{escape(title)}" data-testid="{escape(test_id)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" xmlns="http://www.w3.org/2000/svg">'),
             f"<title>{escape(title)}</title>"]
    base_y = Decimal(HEIGHT - PAD_BOTTOM)
    for fraction in (Decimal(0), Decimal("0.5"), Decimal(1)):
        y = base_y - plot_h * fraction
        parts.append(f'<line x1="{PAD_LEFT}" x2="{WIDTH - 8}" y1="{_n(y)}" y2="{_n(y)}" class="grid"/>')
        parts.append(f'<text x="{PAD_LEFT - 6}" y="{_n(y + 4)}" text-anchor="end" class="axis">'
                     f"{escape(_short(peak * fraction))}</text>")
    if points:
        slot = plot_w / len(points)
        bar = max(slot * Decimal("0.7"), Decimal(1))
        label_every = max(1, len(points) // 10)
        for index, (label, value) in enumerate(points):
            height = plot_h * max(value, Decimal(0)) / peak
            x = Decimal(PAD_LEFT) + slot * index + (slot - bar) / 2
            parts.append(f'<rect x="{_n(x)}" y="{_n(base_y - height)}" width="{_n(bar)}" height="{_n(height)}" '
                         f'class="bar" data-label="{escape(label)}" data-value="{escape(str(value))}">'
                         f"<title>{escape(label)}: {escape(str(value))} {escape(unit)}</title></rect>")
            if index % label_every == 0:
                parts.append(f'<text x="{_n(x + bar / 2)}" y="{HEIGHT - 10}" text-anchor="middle" class="axis">'
                             f"{escape(label[-5:])}</text>")
    else:
        parts.append(f'<text x="{WIDTH // 2}" y="{HEIGHT // 2}" text-anchor="middle" class="axis">No usage in this '
                     "period</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


def _short(value: Decimal) -> str:
    if value >= 1_000_000:
        return f"{(value / 1_000_000).quantize(Decimal('0.1'))}M"
    if value >= 1_000:
        return f"{(value / 1_000).quantize(Decimal('0.1'))}k"
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
