"""The privacy page's chart: cumulative ε per dataset against the site's caps, drawn as a
server-side SVG (no JavaScript, no external asset)."""

from __future__ import annotations

import math
from typing import Any

from markupsafe import Markup, escape

W, H = 780, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 230, 16, 40
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def spend_chart(
    dataset: str,
    points: list[tuple[Any, float]],
    lifetime: float | None,
    per_experiment: float | None,
) -> Markup:
    """An SVG of one dataset's cumulative ε, charge by charge, with the caps as lines.

    Parameters
    ----------
    dataset : str
        Its name (the chart's title).
    points : list of (LedgerEntry, float)
        Each charge on the dataset, oldest first, and the dataset's total after it.
    lifetime, per_experiment : float or None
        The site's caps (``lifetime_epsilon_budget``, ``max_epsilon_per_experiment``).

    Returns
    -------
    Markup
        The ``<svg>`` element; every text in it is escaped.
    """
    caps = [c for c in (lifetime, per_experiment) if c is not None and math.isfinite(c)]
    top = max([p[1] for p in points] + caps + [1e-9]) * 1.08
    n = len(points)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(i: float) -> float:
        return LEFT + (pw * i / max(n, 1))

    def y(v: float) -> float:
        return TOP + ph - ph * v / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" '
        f'height="{H}" role="img" aria-label="cumulative epsilon of {escape(dataset)}">',
        f"<title>ε spent on {escape(dataset)}, charge by charge</title>",
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
    ]
    for k in range(5):  # horizontal grid with ε labels
        v = top * k / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e3e3e3"/>'
            f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_fmt(v)}</text>"
        )
    # The dataset's cumulative spend as a step line (ε rises at each charge).
    path = [f"M {x(0):.1f} {y(0):.1f}"]
    for i, (_, total) in enumerate(points):
        path.append(f"V {y(total):.1f} H {x(i + 1):.1f}")
    parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>')
    for i, (e, total) in enumerate(points):
        parts.append(
            f'<circle cx="{x(i + 1):.1f}" cy="{y(total):.1f}" r="3" fill="{PALETTE[0]}">'
            f"<title>#{e.id} {escape(e.experiment)} round {e.round}: +ε {_fmt(e.epsilon_increment)}"
            f" → {_fmt(total)}</title></circle>"
        )
    legend = [(PALETTE[0], f"ε spent on {dataset}", "")]
    for cap, colour, label in (
        (lifetime, PALETTE[1], "lifetime budget"),
        (per_experiment, PALETTE[3], "cap per experiment"),
    ):
        if cap is None or not math.isfinite(cap):
            continue
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(cap):.1f}" y2="{y(cap):.1f}" '
            f'stroke="{colour}" stroke-dasharray="6 4" stroke-width="1.5"/>'
        )
        legend.append((colour, f"{label} {_fmt(cap)}", "6 4"))
    for k, (colour, label, dash) in enumerate(legend):
        ly = TOP + 10 + 18 * k
        parts.append(
            f'<line x1="{LEFT + pw + 10}" x2="{LEFT + pw + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash or "none"}"/>'
            f'<text x="{LEFT + pw + 34}" y="{ly + 4}" font-size="11">{escape(label)}</text>'
        )
    first = points[0][0].timestamp[:16].replace("T", " ") if points else ""
    last = points[-1][0].timestamp[:16].replace("T", " ") if points else ""
    parts.append(
        f'<text x="{LEFT}" y="{H - 20}" font-size="11">{escape(first)}</text>'
        f'<text x="{LEFT + pw}" y="{H - 20}" font-size="11" text-anchor="end">{escape(last)}</text>'
        f'<text x="{LEFT + pw / 2}" y="{H - 6}" font-size="11" text-anchor="middle">'
        f"charges, oldest first ({n}) · UTC</text>"
        f'<text x="14" y="{TOP + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + ph / 2})">cumulative ε</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))
