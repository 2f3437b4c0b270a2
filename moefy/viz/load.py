"""Expert-load plots: per token position, per expert, and across the layers of a model."""
from __future__ import annotations

from typing import Mapping, Optional, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from ..block import MoEBlock
from ..observe.hf_routing import HFMoELayer
from ..observe.recorder import RoutingRecorder
from ._common import NULL_LABELS, column_colors, column_names, new_figure

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise TypeError(f"{name} must hold real numbers (token counts), got dtype {x.dtype}")
    return x.astype(np.float64)


def _check_block(block) -> MoEBlock:
    if not isinstance(block, (MoEBlock, HFMoELayer)):  # an HFMoELayer: RoutingRecorder(hf_model).blocks[name]
        raise TypeError(f"block must be a MoEBlock or an HFMoELayer, got {type(block).__name__}")
    return block


def _over_capacity(block: MoEBlock, expert_loads) -> str:
    """`` (N slots over capacity, dropped)`` for the title when the plotted last forward dropped some."""
    if expert_loads is not None or block.routing is None:
        return ""
    over = int((block.routing.picked_count - block.routing.count).sum())
    return f" ({over} slots over capacity, dropped)" if over else ""


def plot_experts_load(block: MoEBlock, expert_loads: Optional[ArrayLike] = None) -> Figure:
    """One panel per router column: how many tokens at each position it received.

    Args:
        block: the MoEBlock (names its experts; gives the load of its last forward when ``expert_loads`` is
            None).
        expert_loads: (E', N) token counts per column and position, e.g. ``block.experts_load()`` or a
            recorder's ``stats[name].position_load``; the null experts' rows follow the experts', the hole's
            is last. Assignments dropped over a token-choice capacity are in no row; the title counts them
            (last forward only).
    Returns:
        the Figure, E' axes.
    """
    block = _check_block(block)
    load = _as_numpy(block.experts_load() if expert_loads is None else expert_loads, "expert_loads")
    if load.ndim != 2 or load.shape[0] != block.num_columns:
        raise ValueError(f"expert_loads must have shape (E'={block.num_columns}, positions), "
                         f"got {tuple(load.shape)}")
    names = column_names(block.num_experts, block.hole, block.config.null_columns)
    colors = column_colors(block.num_experts, block.hole, block.config.null_columns)
    fig, axes = new_figure(len(names), panel_size=(3.4, 2.4), sharey=True)
    positions = np.arange(load.shape[1])
    for ax, row, name, color in zip(axes, load, names, colors):
        ax.bar(positions, row, width=1.0, color=color)
        ax.set_title(f"{name}: {int(row.sum())} tokens", fontsize=9)
        ax.set_xlabel("token position")
        ax.set_xlim(-0.5, load.shape[1] - 0.5)
    axes[0].set_ylabel("tokens")
    fig.suptitle(f"Load per position — {block.moe_name}{_over_capacity(block, expert_loads)}", fontsize=10)
    return fig


def plot_total_load(block: MoEBlock, expert_loads: Optional[ArrayLike] = None) -> Figure:
    """Bar chart of the tokens each router column received, with the balanced level dashed.

    Args:
        block: the MoEBlock.
        expert_loads: (E',) counts, or (E', N) per position (summed); default ``block.abs_experts_load()``.
    Returns:
        the Figure, one axes.
    """
    block = _check_block(block)
    load = _as_numpy(block.abs_experts_load() if expert_loads is None else expert_loads, "expert_loads")
    load = load.sum(axis=1) if load.ndim == 2 else load
    if load.ndim != 1 or load.shape[0] != block.num_columns:
        raise ValueError(f"expert_loads must have shape (E'={block.num_columns},) or (E', N), "
                         f"got {tuple(load.shape)}")
    names = column_names(block.num_experts, block.hole, block.config.null_columns)
    fig, (ax,) = new_figure(1, panel_size=(max(3.0, 0.6 * len(names) + 1.5), 2.8))
    ax.bar(names, load, color=column_colors(block.num_experts, block.hole, block.config.null_columns))
    ax.axhline(load.sum() / len(names), color="k", ls="--", lw=1, label="balanced")
    ax.set_ylabel("tokens")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=8)
    ax.set_title(f"Total load — {block.moe_name}{_over_capacity(block, expert_loads)}", fontsize=10)
    return fig


LoadSource = Union[nn.Module, RoutingRecorder, Mapping[str, ArrayLike]]


def layer_loads(source: LoadSource):
    """``[(name, num_experts, hole, load (E',), null_columns)]`` from a model (last forward of each block), a
    recorder (accumulated) or a mapping ``name → (E',)`` loads (treated as experts only, no hole, no null
    experts)."""
    if isinstance(source, RoutingRecorder):
        return [(n, s.num_experts, s.hole, s.load.numpy(), s.null_columns) for n, s in source.stats.items()]
    if isinstance(source, nn.Module):
        blocks = [(n, b) for n, b in source.named_modules() if isinstance(b, MoEBlock)]
        if not blocks:
            raise ValueError("model contains no MoEBlock")
        missing = [n or "model" for n, b in blocks if b.routing is None]
        if missing:
            raise ValueError(f"blocks {missing} have not run a forward yet: run the model on a batch first")
        return [(n or "model", b.num_experts, b.hole, _as_numpy(b.abs_experts_load(), "load"),
                 b.config.null_columns) for n, b in blocks]
    if isinstance(source, Mapping):
        out = [(str(n), len(v), False, _as_numpy(v, f"source[{n!r}]"), ()) for n, v in source.items()]
        if not out or any(v.ndim != 1 or v.size == 0 for _, _, _, v, _ in out):
            raise ValueError("source must map layer names to (E,) load vectors, E >= 1")
        for n, _, _, v, _ in out:
            if not np.isfinite(v).all() or (v < 0).any():
                raise ValueError(f"source[{n!r}] must hold finite token counts >= 0, got {v.tolist()}")
        return out
    raise TypeError(f"source must be a model, a RoutingRecorder or a mapping of loads, got {type(source).__name__}")


def plot_load_heatmap(source: LoadSource, annotate: Optional[bool] = None) -> Figure:
    """Layer × expert heatmap of the fraction of each layer's assignments every column received.

    Layers with fewer experts leave blank (grey) cells; one column per null-expert kind (``copy``, ``const``,
    ``zero``: a layer's columns of that kind summed) and a ``hole`` column collect those of all layers.

    Args:
        source: a model (uses each block's last forward), a :class:`RoutingRecorder` (accumulated counts)
            or ``{layer name: (E,) load}``.
        annotate: write the fraction in each cell (default: when the grid is at most 16 × 24).
    Returns:
        the Figure, one heatmap axes plus its colourbar axes.
    """
    if annotate is not None and not isinstance(annotate, bool):
        raise TypeError(f"annotate must be True, False or None, got {annotate!r}")
    loads = layer_loads(source)
    max_e = max(e for _, e, _, _, _ in loads)
    any_hole = any(h for _, _, h, _, _ in loads)
    kinds = [k for k in NULL_LABELS if any(k in null for *_, null in loads)]  # copy, constant, zero present
    grid = np.full((len(loads), max_e + len(kinds) + any_hole), np.nan)
    for i, (_, e, hole, load, null) in enumerate(loads):
        frac = load / load.sum() if load.sum() else load
        grid[i, :e] = frac[:e]
        for j, kind in enumerate(kinds):
            if kind in null:
                grid[i, max_e + j] = sum(f for f, k in zip(frac[e:], null) if k == kind)
        if hole:
            grid[i, -1] = frac[-1]
    names = [n for n, *_ in loads]
    fig, (ax,) = new_figure(1, panel_size=(1.0 + 0.55 * grid.shape[1], 1.2 + 0.4 * grid.shape[0]))
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(e) for e in range(max_e)] + [NULL_LABELS[k] for k in kinds]
                  + (["hole"] if any_hole else []))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if annotate if annotate is not None else (grid.shape[1] <= 16 and grid.shape[0] <= 24):
        top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="fraction of the layer's assignments")
    ax.set_title("Expert load across layers", fontsize=10)
    return fig
