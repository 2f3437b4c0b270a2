"""Training-log dashboards (seed 004): expert utilization over epochs, router entropy, routing accuracy,
the class × expert affinity heatmap and the metric curves, from a :class:`moefy.observe.log.TrainingLog`; and
the routing-health dashboard: MaxVio, dead experts and load entropy over epochs, the experts' co-activation and
the top-1 transitions between consecutive layers (:mod:`moefy.observe.health`)."""
from __future__ import annotations

import csv
import io
import math
from typing import Callable, List

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..observe.log import LayerSeries, TrainingLog
from ._common import column_colors, column_names, new_figure

MAX_LABELLED = 40  # rows / columns of a heatmap that each get a tick label
MAX_LEGEND = 12  # lines a panel labels in a legend; beyond, none (and utilization draws one LineCollection)


def _check_log(log) -> TrainingLog:
    if not isinstance(log, TrainingLog):
        raise TypeError(f"log must be a TrainingLog (moefy.read_log(path)), got {type(log).__name__}")
    return log


def _plain(text: str) -> str:
    """``text`` shown as it is: a ``$`` in a layer / metric name or path would start matplotlib mathtext
    (and ``$\\frac$`` fails to render)."""
    return str(text).replace("$", r"\$")


def _columns(series: LayerSeries) -> List[str]:
    return column_names(series.num_experts, series.hole, series.null_columns)


def _draw_utilization(ax, log: TrainingLog, series: LayerSeries) -> None:
    util = np.asarray(series.utilization)
    names = _columns(series)
    colors = column_colors(series.num_experts, series.hole, series.null_columns)
    if len(names) <= MAX_LEGEND:
        for j, (name, color) in enumerate(zip(names, colors)):
            ax.plot(log.epochs, util[:, j], marker="o", ms=3, color=color, label=name,
                    ls="--" if name == "hole" else "-")
    else:  # one artist for all columns: hundreds of Line2D (~10 KB each) cost seconds and tens of MB
        epochs = np.asarray(log.epochs, dtype=float)
        ax.add_collection(LineCollection([np.column_stack([epochs, util[:, j]]) for j in range(len(names))],
                                         colors=colors, linewidths=1,
                                         linestyles=["--" if name == "hole" else "-" for name in names]))
        ax.autoscale_view()
    ax.axhline(1 / util.shape[1], color="k", lw=0.8, ls=":", label="balanced")
    ax.set_ylim(0, max(1.0, float(util.max()) * 1.05))
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction of assignments")
    ax.set_title(f"Expert utilization — {_plain(series.name)}", fontsize=9)
    if len(names) <= MAX_LEGEND:
        ax.legend(fontsize=7, ncol=2)


def _floats(values) -> np.ndarray:
    """A logged series with None (an epoch that did not log it) as NaN, so that the line skips it."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _draw_lines(ax, log: TrainingLog, values, title: str, ylabel: str) -> bool:
    drawn = False
    for name, ys in values:
        ys = _floats(ys)
        if np.isfinite(ys).any():
            ax.plot(log.epochs, ys, marker="o", ms=3, label=_plain(name))
            drawn = True
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title), fontsize=9)
    if drawn and len(values) > 1:
        ax.legend(fontsize=7)
    return drawn


def _draw_entropy(ax, log: TrainingLog) -> None:
    _draw_lines(ax, log, [(s.name, s.entropy) for s in log.layers.values()], "Router entropy", "nats")
    tops = sorted({s.num_columns for s in log.layers.values()})
    for n in tops:
        ax.axhline(math.log(n), color="k", lw=0.8, ls=":")
    ax.set_ylim(bottom=0)


def _short_columns(series: LayerSeries) -> List[str]:
    return [c.replace("expert ", "") for c in _columns(series)]


def _row_fractions(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)


def _heatmap(fig, ax, frac: np.ndarray, xticks, yticks, xlabel: str, ylabel: str, title: str, bar: str) -> None:
    """``frac`` (rows, columns) in [0, 1] (NaN: blank) with its labels; ``xticks`` / ``yticks`` None for
    integer ticks."""
    im = ax.imshow(frac, cmap=colormaps["magma"], vmin=0, vmax=1, aspect="auto")
    # a label per row / column while they are readable; beyond, a few integer ticks (thousands of tick
    # labels take minutes to lay out)
    for axis, set_ticks, n, labels in ((ax.xaxis, ax.set_xticks, frac.shape[1], xticks),
                                       (ax.yaxis, ax.set_yticks, frac.shape[0], yticks)):
        if n <= MAX_LABELLED:
            set_ticks(range(n), labels if labels is not None else [str(i) for i in range(n)])
        else:
            axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(title, fontsize=9)
    if frac.size <= 400:
        for (i, j), v in np.ndenumerate(frac):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label=bar)


def _draw_affinity(fig, ax, series: LayerSeries) -> None:
    _heatmap(fig, ax, _row_fractions(series.affinity), _short_columns(series), None, "expert", "class",
             f"Router affinity (epoch {series.affinity_epoch}) — {_plain(series.name)}",
             "fraction of the class's assignments")


def _draw_coactivation(fig, ax, series: LayerSeries) -> None:
    counts = np.asarray(series.coactivation, dtype=float)
    frac = counts / np.maximum(np.diag(counts)[:, None], 1e-12)  # of expert i's tokens, the share also at j
    np.fill_diagonal(frac, np.nan)
    labels = [str(e) for e in range(counts.shape[0])]
    _heatmap(fig, ax, frac, labels, labels, "also routed to expert j", "expert i",
             f"Co-activation (epoch {series.coactivation_epoch}) — {_plain(series.name)}",
             "fraction of expert i's tokens")


def _draw_transition(fig, ax, log: TrainingLog, series: LayerSeries) -> None:
    target = log.layers.get(series.transition_to)
    _heatmap(fig, ax, _row_fractions(series.transition), None if target is None else _short_columns(target),
             _short_columns(series), f"top-1 in {series.transition_to}", f"top-1 in {series.name}",
             f"Top-1 transitions (epoch {series.transition_epoch})", "fraction of the row's tokens")


def _health_series(log: TrainingLog, values, title: str, ylabel: str, dashed=None) -> Callable:
    """A drawer of one line per layer (``values(series)`` aligned with the epochs; ``dashed``: a second, dashed
    line of the same colour)."""
    def draw(ax) -> None:
        layers = [s for s in log.layers.values() if s.has_health]
        for i, s in enumerate(layers):
            color = f"C{i % 10}"
            for get, style, label in ((values, "-", _plain(s.name)), (dashed, "--", None)):
                if get is None:
                    continue
                ys = _floats(get(s))
                if np.isfinite(ys).any():
                    ax.plot(log.epochs, ys, marker="o", ms=3, ls=style, color=color, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        if 1 < len(layers) <= MAX_LEGEND:
            ax.legend(fontsize=7)
    return draw


def _health_panels(log: TrainingLog):
    """The line panels of the health dashboard: MaxVio, dead experts, load entropy."""
    if not any(s.has_health for s in log.layers.values()):
        raise ValueError(f"{log.path}: no routing health fields (max_vio, dead, ...) in the log")
    max_vio = _health_series(log, lambda s: s.max_vio, "MaxVio (solid: epoch's load; dashed: mean over batches)",
                             "max load / mean load - 1", dashed=lambda s: s.max_vio_batch)
    dead = _health_series(log, lambda s: [None if d is None else len(d) for d in s.dead],
                          "Dead experts (no token in the epoch)", "experts")
    entropy = _health_series(log, lambda s: s.load_entropy, "Load entropy (dotted: log E, uniform)", "nats")

    def entropy_with_bounds(ax) -> None:
        entropy(ax)
        for n in sorted({s.num_experts for s in log.layers.values() if s.has_health}):
            ax.axhline(math.log(n), color="k", lw=0.8, ls=":")
    return [max_vio, dead, entropy_with_bounds]


def _one_panel(draw: Callable) -> Figure:
    """A figure of one axes drawn by ``draw(ax)``."""
    fig, (ax,) = new_figure(1, panel_size=(4.2, 3.0))
    draw(ax)
    return fig


def _heatmap_per_layer(log: TrainingLog, field: str, draw: Callable) -> Figure:
    """One panel per layer whose ``field`` matrix was logged, drawn by ``draw(fig, ax, series)``; ValueError
    when no layer logged one."""
    _check_log(log)
    layers = [s for s in log.layers.values() if getattr(s, field) is not None]
    if not layers:
        raise ValueError(f"{log.path}: no {field!r} matrix in the log")
    fig, axes = new_figure(len(layers), panel_size=(4.4, 3.6), max_cols=3)
    for ax, series in zip(axes, layers):
        draw(fig, ax, series)
    return fig


def plot_utilization(log: TrainingLog) -> Figure:
    """One panel per layer: the fraction of assignments every router column received, over epochs.
    A hole column (``"hole": true`` in the log) is drawn grey and dashed. Returns the Figure (one axes per
    layer)."""
    _check_log(log)
    fig, axes = new_figure(len(log.layers), panel_size=(4.2, 3.0), max_cols=3)
    for ax, series in zip(axes, log.layers.values()):
        _draw_utilization(ax, log, series)
    return fig


def plot_entropy(log: TrainingLog) -> Figure:
    """Mean router entropy per layer over epochs; dotted: log E', the entropy of a uniform router."""
    _check_log(log)
    return _one_panel(lambda ax: _draw_entropy(ax, log))


def plot_routing_accuracy(log: TrainingLog) -> Figure:
    """Routing accuracy per layer over epochs. Raises ValueError when the log has none (trained without
    labels)."""
    _check_log(log)
    fig, (ax,) = new_figure(1, panel_size=(4.2, 3.0))
    if not _draw_lines(ax, log, [(s.name, s.routing_acc) for s in log.layers.values()],
                       "Routing accuracy", "fraction routed to the class's expert"):
        raise ValueError(f"{log.path}: no routing_acc values (the run logged no labels)")
    ax.set_ylim(0, 1.02)
    return fig


def plot_affinity(log: TrainingLog) -> Figure:
    """One heatmap per layer that logged an affinity matrix: row c = where tokens of class c went
    (fractions of the row, from the last epoch that logged it). Raises ValueError when there is none."""
    return _heatmap_per_layer(log, "affinity", _draw_affinity)


def plot_metrics(log: TrainingLog) -> Figure:
    """One panel per metric over epochs. Raises ValueError when the log has no metrics."""
    _check_log(log)
    if not log.metrics:
        raise ValueError(f"{log.path}: no 'metrics' in the log")
    fig, axes = new_figure(len(log.metrics), panel_size=(3.6, 2.8), max_cols=4)
    for ax, (name, values) in zip(axes, log.metrics.items()):
        _draw_lines(ax, log, [(name, values)], name, name)
    return fig


def plot_max_vio(log: TrainingLog) -> Figure:
    """MaxVio per layer over epochs: of the epoch's summed load (solid) and the mean of its batches' (dashed).
    Raises ValueError when the log has no health fields."""
    _check_log(log)
    return _one_panel(_health_panels(log)[0])


def plot_dead_experts(log: TrainingLog) -> Figure:
    """Experts without a token per layer over epochs. Raises ValueError when the log has no health fields."""
    _check_log(log)
    return _one_panel(_health_panels(log)[1])


def plot_coactivation(log: TrainingLog) -> Figure:
    """One heatmap per layer that logged a co-activation matrix (the last one): row i, column j = the fraction
    of expert i's tokens that expert j also processed (diagonal blank). Raises ValueError when there is none."""
    return _heatmap_per_layer(log, "coactivation", _draw_coactivation)


def plot_transition(log: TrainingLog) -> Figure:
    """One heatmap per layer that logged top-1 transitions to the next layer (the last ones): row i, column j =
    the fraction of the tokens whose top-1 column was i in this layer that had j in the next. Raises ValueError
    when there is none."""
    return _heatmap_per_layer(log, "transition", lambda fig, ax, series: _draw_transition(fig, ax, log, series))


def plot_health(log: TrainingLog) -> Figure:
    """The routing-health dashboard: MaxVio, dead experts and load entropy per layer over epochs, then the
    co-activation heatmap of every layer and the transition heatmap of every consecutive pair that logged one
    (their last epoch). Raises ValueError when the log has no health fields (a log from before them)."""
    _check_log(log)
    lines = _health_panels(log)
    coact = [s for s in log.layers.values() if s.coactivation is not None]
    trans = [s for s in log.layers.values() if s.transition is not None]
    fig, axes = new_figure(len(lines) + len(coact) + len(trans), panel_size=(4.2, 3.4), max_cols=3)
    it = iter(axes)
    for draw in lines:
        draw(next(it))
    for s in coact:
        _draw_coactivation(fig, next(it), s)
    for s in trans:
        _draw_transition(fig, next(it), log, s)
    fig.suptitle(f"moefy routing health: {_plain(log.path)}", fontsize=10)
    return fig


def plot_dashboard(log: TrainingLog) -> Figure:
    """Everything on one page: utilization per layer, entropy, routing accuracy (if logged), each metric
    and the affinity heatmap of every layer that logged one."""
    _check_log(log)
    layers = list(log.layers.values())
    has_acc = any(v is not None for s in layers for v in s.routing_acc)
    with_aff = [s for s in layers if s.affinity is not None]
    panels = len(layers) + 1 + has_acc + len(log.metrics) + len(with_aff)
    fig, axes = new_figure(panels, panel_size=(4.2, 3.2), max_cols=3)
    it = iter(axes)
    for s in layers:
        _draw_utilization(next(it), log, s)
    _draw_entropy(next(it), log)
    if has_acc:
        ax = next(it)
        _draw_lines(ax, log, [(s.name, s.routing_acc) for s in layers], "Routing accuracy", "fraction")
        ax.set_ylim(0, 1.02)
    for name, values in log.metrics.items():
        _draw_lines(next(it), log, [(name, values)], name, name)
    for s in with_aff:
        _draw_affinity(fig, next(it), s)
    fig.suptitle(f"moefy training log: {_plain(log.path)}", fontsize=10)
    return fig


def affinity_csv(series: LayerSeries) -> str:
    """The affinity matrix of ``series`` as CSV: a ``class`` column, then one column per router column,
    holding the fraction of the class's assignments (rows sum to 1), then the class's ``count``."""
    if not isinstance(series, LayerSeries):
        raise TypeError(f"series must be a LayerSeries (a value of TrainingLog.layers), got {type(series).__name__}")
    if series.affinity is None:
        raise ValueError(f"layer {series.name!r} logged no affinity matrix")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *_columns(series), "count"])
    for c, row in enumerate(series.affinity):
        total = float(sum(row))
        writer.writerow([c, *(f"{v / total:.6f}" if total else "0" for v in row), f"{total:g}"])
    return buf.getvalue()


def safe_name(name: str) -> str:
    """A layer name usable in a file name (at most 80 characters)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name[:80]) or "model"


__all__ = ["plot_utilization", "plot_entropy", "plot_routing_accuracy", "plot_affinity", "plot_metrics",
           "plot_dashboard", "affinity_csv", "plot_max_vio", "plot_dead_experts", "plot_coactivation",
           "plot_transition", "plot_health"]
