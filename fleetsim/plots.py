"""PNG plots of a sweep. matplotlib is imported inside each function, with the
Agg backend, so the simulator and its tests run without matplotlib or a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# A TTFT of 0 ms cannot sit on a log axis: clip to this floor (ms) rather than drop it,
# so every CDF still reaches 1.0 without stretching the axis over decades of nothing.
_MIN_LOG_MS = 0.1


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=120)
    return out


def plot_goodput(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    threshold: float = 0.9,
) -> Path:
    """SLO attainment against request rate, one line per label, threshold dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    try:
        for label, points in curves.items():
            pts = sorted(points)
            if not pts:
                continue
            ax.plot([r for r, _ in pts], [a for _, a in pts], marker="o", label=label)
        ax.axhline(
            threshold, color="grey", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}"
        )
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0.0, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)  # sweeps draw many figures; pyplot keeps them all alive otherwise


def plot_ttft_cdf(samples: Mapping[str, Sequence[float]], path: str | os.PathLike[str]) -> Path:
    """Empirical CDF of TTFT (ms, log x axis), one step line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    try:
        for label, values in samples.items():
            xs = sorted(max(float(v), _MIN_LOG_MS) for v in values)
            if not xs:
                continue
            n = len(xs)
            # Start at (x_min, 0) so each curve rises from the axis at its first sample.
            ys = [0.0] + [(i + 1) / n for i in range(n)]
            ax.step([xs[0], *xs], ys, where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)
