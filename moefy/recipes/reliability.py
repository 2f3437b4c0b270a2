"""Reliability diagrams (Guo et al. 2017) from :class:`moefy.recipes.metrics.ReliabilityBins`."""
from __future__ import annotations

from typing import Mapping

from matplotlib.figure import Figure

from .metrics import ReliabilityBins


def plot_reliability(bins: Mapping[str, ReliabilityBins]) -> Figure:
    """One panel per model: per-bin accuracy as bars against the diagonal of perfect calibration, the gap
    to each bin's mean confidence shaded, ECE in the title, the share of samples per bin underneath.

    Args:
        bins: model name → its reliability bins (e.g. ``{"dense": reliability_bins(p, y), "moe": ...}``).
    Returns:
        a Figure (nothing is shown); ``fig.savefig(path)``.
    """
    if not isinstance(bins, Mapping) or not bins or not all(isinstance(b, ReliabilityBins) for b in bins.values()):
        raise TypeError("bins must be a non-empty mapping of name -> ReliabilityBins")
    fig = Figure(figsize=(3.6 * len(bins), 4.2), layout="constrained")
    grid = fig.add_gridspec(2, len(bins), height_ratios=(3, 1))
    for col, (name, b) in enumerate(bins.items()):
        edges = b.edges.numpy()
        width, left = edges[1:] - edges[:-1], edges[:-1]
        full = (b.counts > 0).numpy()
        acc, conf = b.accuracy.nan_to_num(0).numpy(), b.confidence.nan_to_num(0).numpy()
        ax = fig.add_subplot(grid[0, col])
        ax.bar(left[full], acc[full], width=width[full], align="edge", color="#4c72b0", edgecolor="white",
               label="accuracy")
        ax.bar(left[full], conf[full] - acc[full], bottom=acc[full], width=width[full], align="edge",
               color="#dd8452", alpha=0.45, edgecolor="#dd8452", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{name}  (ECE {100 * b.ece:.2f}%)")
        ax.legend(loc="upper left", fontsize="small")
        share = fig.add_subplot(grid[1, col], sharex=ax)
        share.bar(left, (b.counts / b.counts.sum().clamp_min(1)).numpy(), width=width, align="edge",
                  color="#8c8c8c", edgecolor="white")
        share.set(xlabel="confidence", ylabel="share")
    return fig
