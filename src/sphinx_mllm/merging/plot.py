"""The picture of a mixing sweep: a benchmark score against the mixing coefficient (PNG, written atomically)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping

from sphinx_mllm.utils import SphinxError, atomic_write_bytes


def plot_sweep(scores: Mapping[float, float], out: str | os.PathLike, param: str = "beta", metric: str = "score",
               title: str | None = None) -> None:
    """Write a line plot of `scores` ({value of `param`: score}) to `out`, best value marked."""
    points = sorted((float(x), float(y)) for x, y in scores.items())
    if not points:
        raise SphinxError("plot_sweep: no scores to plot")
    bad = [(x, y) for x, y in points if not (math.isfinite(x) and math.isfinite(y))]
    if bad:
        raise SphinxError(f"plot_sweep: scores must be finite numbers, got {bad}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs, ys = [x for x, _ in points], [y for _, y in points]
    ax.plot(xs, ys, marker="o")
    best_x, best_y = max(points, key=lambda p: p[1])
    ax.scatter([best_x], [best_y], s=120, facecolors="none", edgecolors="red", zorder=3,
               label=f"best: {param} = {best_x:g} ({best_y:.4g})")
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} against {param}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
