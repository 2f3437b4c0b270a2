"""Shared plotting helpers: figures made without pyplot's global state, so plots work under any backend
(Agg included) and never show or leak windows."""
from __future__ import annotations

import math
from typing import Tuple

from matplotlib.figure import Figure

HOLE_COLOR = "#9a9a9a"


def new_figure(panels: int, panel_size: Tuple[float, float] = (3.2, 2.6), max_cols: int = 4,
               **subplot_kw):
    """A Figure with ``panels`` axes on a grid of at most ``max_cols`` columns; unused cells removed.
    Returns (fig, list of axes)."""
    cols = max(1, min(panels, max_cols))
    rows = max(1, math.ceil(panels / cols))
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **subplot_kw).ravel().tolist()
    for ax in axes[panels:]:
        ax.remove()
    return fig, axes[:panels]


def column_names(num_experts: int, hole: bool):
    """Router column labels: ``expert 0`` … ``expert E-1`` and ``hole``."""
    return [f"expert {e}" for e in range(num_experts)] + (["hole"] if hole else [])


def expert_colors(n: int):
    """n distinct colours from tab10 / tab20."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
