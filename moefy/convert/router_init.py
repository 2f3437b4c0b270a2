"""A router that starts informed: every mixture's router rows set from the inputs that router actually reads.

:func:`init_router` runs the model on some data (eval mode, no grad; every module's train/eval flag restored),
records each mixture's router input with a forward pre-hook on its ``router`` (the (T, D) rows it scores: per
token, or the pooled per-sample features; padding masked out by ``token_mask`` is not included), and sets the
rows of the E real experts (the gate's first E rows; a hole / null-expert column keeps its row):

- ``method="mean"`` (mergekit-moe's ``gate_mode: hidden``): ``data`` holds one batch list per expert; row i
  is the mean router input over expert i's batches, at that mixture.
- ``method="kmeans"``: row j is centroid j of a k-means (:func:`~moefy.convert.kmeans.kmeans`, E clusters,
  k-means++ start from ``seed``) of the mixture's router inputs over all of ``data``'s batches.

Scale. With ``normalize=True`` (the default, as mergekit) each row is divided by its L2 norm, then multiplied by
``scale``: ``row_i = scale · m_i / ||m_i||``. A bias-free linear gate scores ``<x, row_i>``; raw means would add
``||m_i||`` to every score of expert i, so an expert whose data has large activations would win every token.
With unit rows the score is ``scale · ||x|| · cos(x, m_i)``: a token goes to the expert whose mean (centroid)
points most its way. ``normalize=False`` keeps ``row_i = scale · m_i``. Note that for k-means, nearest-centroid
assignment (``argmax <x, c_j> - ||c_j||²/2``) needs a bias a plain gate does not have: unit rows route by angle.

By default all mixtures are captured in one pass over the data: a later layer's inputs are taken with the earlier
layers' routers as they were before the call (exact for mixtures of identical copies). ``layerwise=True`` sets
them one at a time, each from inputs captured after the earlier ones were set; ``moefy(..., experts_from=...,
router_init=...)`` does that, since there the experts differ.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_bool, check_choice, check_int, check_number
from ..modes import evaluating
from .kmeans import kmeans

__all__ = ["init_router"]
logger = logging.getLogger(__name__)

METHODS = ("mean", "kmeans")


def check_router_init(router_init, router_data) -> None:
    """``moefy(router_init=..., router_data=...)``: a method of :data:`METHODS` or None, with data iff a method."""
    check_choice(router_init, "router_init", METHODS, optional=True)
    if router_init is None and router_data is not None:
        raise ValueError("router_data is given but router_init is None: pass router_init='mean' or 'kmeans'")
    if router_init is not None and router_data is None:
        raise ValueError(f"router_data: router_init={router_init!r} needs router_data (see init_router)")


def _is_batch(value) -> bool:
    return isinstance(value, (torch.Tensor, Mapping, tuple))


def _batches(value, name: str) -> List:
    """One batch (a tensor: ``model(x)``; a mapping: ``model(**kw)``; a tuple: ``model(*args)``) or a list of them."""
    batches = [value] if _is_batch(value) else value
    if not isinstance(batches, list):
        raise TypeError(f"{name} must be a batch (a tensor, a dict of model keyword arguments, a tuple of "
                        f"positional arguments) or a list of batches, got {type(value).__name__}")
    if not batches:
        raise ValueError(f"{name} must hold at least one batch, got an empty list")
    for j, b in enumerate(batches):
        if not _is_batch(b):
            raise TypeError(f"{name}[{j}] must be a batch (a tensor, a dict or a tuple), got {type(b).__name__}")
    return batches


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(*batch)


def mixtures_of(model: nn.Module) -> Dict[str, MoEBlock]:
    """Every mixture of ``model`` (``model`` itself, path ``""``, if it is one), by path, in module order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, MoEBlock)}


@torch.no_grad()
def router_inputs(model: nn.Module, batches: List, mixtures: Dict[str, MoEBlock]) -> Dict[str, torch.Tensor]:
    """Run ``model`` on ``batches`` in eval mode → {path: (N, D) float64 router inputs of that mixture}.

    Every module's train/eval flag is restored afterwards (also on error); hooks are removed.
    """
    seen: Dict[str, List[torch.Tensor]] = {p: [] for p in mixtures}

    def hook(path):
        return lambda module, args: seen[path].append(args[0].detach().to(torch.float64))  # (T, D)

    handles = [m.router.register_forward_pre_hook(hook(p)) for p, m in mixtures.items()]
    try:
        with evaluating(model):
            for batch in batches:
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(rows) if rows else torch.zeros(0, mixtures[p].input_dim, dtype=torch.float64)
            for p, rows in seen.items()}


def _rows(centres: torch.Tensor, normalize: bool, scale: float, what: str) -> torch.Tensor:
    """(E, D) float64 centres → rows: ``scale · c / ||c||`` (normalize) or ``scale · c``."""
    if not normalize:
        return scale * centres
    norms = centres.norm(dim=1, keepdim=True)                             # (E, 1)
    if bool((norms == 0).any()):
        raise ValueError(f"data: {what} is the zero vector, which has no direction to normalise; pass "
                         f"normalize=False")
    return scale * centres / norms


def _set(mixture: MoEBlock, rows: torch.Tensor) -> None:
    gate = mixture.router.gate.weight                                     # (E', D)
    gate[: rows.shape[0]].copy_(rows.to(gate.device, gate.dtype))


def init_router(model_or_mixture: nn.Module, data, method: str = "mean", *, normalize: bool = True,
                scale: float = 1.0, seed: int = 0, iters: int = 100, layerwise: bool = False) -> Dict[str, torch.Tensor]:
    """Set the router rows of every mixture in ``model_or_mixture`` from its router inputs on ``data``.

    Args:
        model_or_mixture: a mixture, or a model holding mixtures (each gets rows from its own inputs).
        data: a batch is a tensor (``model(x)``), a dict (``model(**batch)``: HF ``input_ids`` ...) or a tuple
            (``model(*batch)``). ``"mean"``: a list of E entries, entry i a batch or a list of batches that
            expert i should own (every mixture must have E experts). ``"kmeans"``: a batch or a list of batches.
        method: ``"mean"`` or ``"kmeans"`` (see the module docstring).
        normalize: unit-L2 rows (then times ``scale``); False: the means / centroids times ``scale``.
        scale: a number > 0 multiplying every row.
        seed, iters: the k-means's seed and most Lloyd iterations.
        layerwise: set the mixtures one at a time in module order, each from inputs captured after the earlier
            ones were set (one pass over ``data`` per mixture): what mixtures whose experts differ
            (``experts_from``) need, where a later layer's inputs depend on the earlier routers. False: one pass
            for all, exact for mixtures of identical copies.
    Returns:
        {mixture path: (E, D) float64 rows as set (before the cast to the gate's dtype)}.
    """
    if not isinstance(model_or_mixture, nn.Module):
        raise TypeError(f"model_or_mixture must be an nn.Module, got {type(model_or_mixture).__name__}")
    check_choice(method, "method", METHODS)
    check_bool(normalize, "normalize")
    scale = check_number(scale, "scale", low=0, low_open=True, what="a positive finite number")
    check_int(seed, "seed")
    check_int(iters, "iters", min=1)
    check_bool(layerwise, "layerwise")
    mixtures = mixtures_of(model_or_mixture)
    if not mixtures:
        raise ValueError(f"model_or_mixture: {type(model_or_mixture).__name__} holds no mixture; moefy it first")
    rows: Dict[str, torch.Tensor] = {}
    for group in ([{p: m} for p, m in mixtures.items()] if layerwise else [mixtures]):
        centres = _centres(model_or_mixture, data, method, group, seed, iters)
        group_rows = {p: _rows(c, normalize, scale, f"a {method} row of mixture {p or '(root)'!r}")
                      for p, c in centres.items()}
        with torch.no_grad():
            for p, r in group_rows.items():
                _set(mixtures[p], r)
        rows.update(group_rows)
    logger.info("moefy: router rows of %d mixture(s) set from %s of their router inputs (%s)", len(rows),
                "per-expert means" if method == "mean" else "k-means centroids",
                f"unit L2 norm x {scale:g}" if normalize else f"unnormalised x {scale:g}")
    return rows


def _centres(model: nn.Module, data, method: str, mixtures: Dict[str, MoEBlock], seed: int,
             iters: int) -> Dict[str, torch.Tensor]:
    """{path: (E, D) float64}: per-expert means or k-means centroids of each mixture's router inputs."""
    if method == "mean":
        return _expert_means(model, data, mixtures)
    centres = {}
    for p, x in router_inputs(model, _batches(data, "data"), mixtures).items():
        e = mixtures[p].num_experts
        if x.shape[0] < e:
            raise ValueError(f"data: mixture {p or '(root)'!r} read {x.shape[0]} router inputs, fewer than its "
                             f"{e} experts: k-means needs at least one per cluster")
        centres[p] = kmeans(x, e, seed=seed, iters=iters)[0]
    return centres


def _expert_means(model: nn.Module, data, mixtures: Dict[str, MoEBlock]) -> Dict[str, torch.Tensor]:
    """{path: (E, D) float64}: row i the mean router input at that mixture over expert i's batches."""
    if _is_batch(data) or not isinstance(data, (list, tuple)):
        raise TypeError(f"data: method='mean' needs a list with one batch list per expert, got {type(data).__name__}")
    for p, m in mixtures.items():
        if len(data) != m.num_experts:
            raise ValueError(f"data: method='mean' needs one batch list per expert: mixture {p or '(root)'!r} has "
                             f"{m.num_experts} experts, data has {len(data)} entries")
    means = {p: [] for p in mixtures}
    for i, entry in enumerate(data):
        for p, x in router_inputs(model, _batches(entry, f"data[{i}]"), mixtures).items():
            if x.shape[0] == 0:
                raise ValueError(f"data[{i}]: mixture {p or '(root)'!r} read no router input from expert {i}'s "
                                 f"batches")
            means[p].append(x.mean(0))
    return {p: torch.stack(m) for p, m in means.items()}
