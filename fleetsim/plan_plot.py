"""The planner's frontier PNG: goodput per GPU against tail latency, per candidate."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cplane.fleetsim.plots import _pyplot, _save


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-best points (lower x, higher y), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, out = float("-inf"), []
    for i in order:
        if points[i][1] > best:
            best = points[i][1]
            out.append(i)
    return out


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str],
                  title: str = "") -> Path:
    """Goodput@90 per GPU (y) against TTFT p99 at the reference rate (x, log), one
    point per candidate (circles unified, squares PD); the frontier joined; the
    first row (the winner) starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [(float(r["ttft_p99_ms"] or 0.0) or 0.1, float(r["goodput_per_gpu"])) for r in rows]
    for r, (x, y) in zip(rows, pts, strict=True):
        ax.scatter([x], [y], marker="o" if r["mode"] == "unified" else "s", alpha=0.6)
        ax.annotate(f"{r['layout']} {r['mode']}", (x, y), fontsize=7, alpha=0.8,
                    textcoords="offset points", xytext=(4, 3))
    idx = frontier(pts)
    if idx:
        ax.plot([pts[i][0] for i in idx], [pts[i][1] for i in idx], "k--", lw=1,
                label="frontier")
    if pts:
        ax.scatter([pts[0][0]], [pts[0][1]], marker="*", s=250, c="gold", edgecolors="k",
                   zorder=5, label="winner")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT p99 at the reference rate (ms)")
    ax.set_ylabel("goodput@90 per GPU (req/s)")
    ax.set_title(title or "layouts")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


__all__ = ["frontier", "plot_frontier"]
