"""Shared plotting helpers: figures made without pyplot's global state, so plots work under any backend
(Agg included) and never show or leak windows."""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

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


NULL_COLORS = {"copy": "#6f8fa8", "constant": "#b39a6b", "zero": "#c4c4c4"}
NULL_LABELS = {"copy": "copy", "constant": "const", "zero": "zero"}


def column_names(num_experts: int, hole: bool, null_columns: Sequence[str] = ()):
    """Router column labels: ``expert 0`` … ``expert E-1``, the null experts numbered per kind (``copy 0``,
    ``const 0``, ``zero 0``, ...) and ``hole``."""
    seen: Dict[str, int] = {}
    nulls = []
    for kind in null_columns:
        nulls.append(f"{NULL_LABELS[kind]} {seen.get(kind, 0)}")
        seen[kind] = seen.get(kind, 0) + 1
    return [f"expert {e}" for e in range(num_experts)] + nulls + (["hole"] if hole else [])


def column_colors(num_experts: int, hole: bool, null_columns: Sequence[str] = ()):
    """One colour per router column: the experts', a muted one per null kind, grey for the hole."""
    return expert_colors(num_experts) + [NULL_COLORS[k] for k in null_columns] + [HOLE_COLOR] * hole


def expert_colors(n: int):
    """n distinct colours from tab10 / tab20."""
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
