"""Fine-grained (granular) upcycling: experts that are slices of the dense FFN along its hidden neurons.

With granularity G the H hidden neurons are split into G slices of H/G (``split``: ``"contiguous"``,
``"random"``: a permutation from torch's RNG, ``"clustered"``: balanced k-means of the neurons' up/gate
weight rows into G equal clusters, as LLaMA-MoE's neuron splits). Each slice is a copy of the module with only
its neurons: its rows of the up/gate layers (and their bias), its columns of the down layer. E = num_experts
must be r·G: r copies of every slice. Expert ``e = c·G + g`` is slice ``g`` of copy ``c``; slice g of every copy
holds the same neurons. Every slice's down weight is multiplied by G, its down bias kept as is.
References: Megatron-Core ``--moe-upcycling-granularity``, OLMo-core's virtual-group upcycling (router
weights duplicated per group).

The router starts with copied rows: row ``c·G + g`` = row ``c·G`` for every g, so the G slices of copy c get
the same score. Exact at init (the mixture computes the dense ``f(x)``, up to float rounding) when
(:func:`exactness` checks each):

- token choice, ``normalize=True``, no hole, no null experts, no token capacity, no noise,
  ``routed_scaling_factor=1``, ``aggregation='sum'``, no group-limited routing, no shared experts,
  ``expert_noise=0``, ``drop_fraction=0``;
- ``k = G·m`` (an int): the k picks are m whole copies (all G slices of each; ties between copies aside);
- the router rows (and ``score_correction_bias``) are still copied across the slices of each copy.

Then, with ``f(x) = W h(x) + b`` (W (D, H) the down weight, h the H hidden activations, W_g / h_g slice g's
columns / neurons) and p_c the score of a picked copy c, every slice of copy c gets the weight p_c/(G·Σp) and
computes ``G·W_g h_g(x) + b``, so the mixture is
``Σ_c p_c/(G·Σp) · Σ_g (G·W_g h_g(x) + b) = Σ_c p_c/Σp · (W h(x) + b) = f(x)``.
"""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_choice, check_int, check_module, check_number
from ..modes import evaluating
from .drop_upcycling import drop_upcycle
from .ffn_parts import FFNParts, features, is_conv1d, neuron_dim, neuron_rows, require_ffn_parts

__all__ = ["upcycled_experts", "exactness", "merged_copies"]

SPLITS = ("contiguous", "random", "clustered")


def _balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """(H, G) distances -> (H,) labels, every cluster exactly ``size`` neurons: greedy over the sorted pairs."""
    h, g = dist.shape
    labels, room, left = [-1] * h, [size] * g, h
    for flat in dist.flatten().argsort().tolist():
        n, c = divmod(flat, g)
        if labels[n] < 0 and room[c]:
            labels[n], room[c], left = c, room[c] - 1, left - 1
            if not left:
                break
    return torch.tensor(labels)


def balanced_kmeans(points: torch.Tensor, groups: int, iters: int = 30) -> torch.Tensor:
    """``points`` (H, F) -> (H,) labels in [0, groups), each label on exactly H / groups points (torch's RNG
    picks the initial centroids)."""
    size = points.shape[0] // groups
    centroids = points[torch.randperm(points.shape[0])[:groups]]  # (G, F)
    labels = None
    for _ in range(iters):
        new = _balanced_assign(torch.cdist(points, centroids), size)  # (H,)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([points[labels == c].mean(0) for c in range(groups)])  # (G, F)
    return labels


def neuron_groups(module: nn.Module, parts: FFNParts, granularity: int, split: str = "contiguous") -> torch.Tensor:
    """(G, H/G) long: the hidden neurons of each slice, ascending within a slice (clusters ordered by their
    first neuron)."""
    h, g = parts.hidden, granularity
    if split == "contiguous":
        return torch.arange(h).view(g, h // g)
    if split == "random":
        return torch.randperm(h).view(g, h // g).sort(dim=1).values
    labels = balanced_kmeans(neuron_rows(module, parts), g)  # (H,)
    groups = [torch.nonzero(labels == c).flatten() for c in range(g)]
    return torch.stack(sorted(groups, key=lambda t: t[0].item()))


def _cut(layer: nn.Module, index: torch.Tensor, up: bool) -> None:
    """Keep only the neurons ``index`` (n,) of ``layer`` (in place), parameters re-made with their flags."""
    dim, w = neuron_dim(layer, up), layer.weight
    layer.weight = nn.Parameter(w.detach().index_select(dim, index.to(w.device)).clone(), w.requires_grad)
    if up and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[index.to(w.device)].clone(), layer.bias.requires_grad)
    n = index.numel()
    if is_conv1d(layer):
        layer.nf, layer.nx = (n, layer.nx) if up else (layer.nf, n)
    else:
        layer.in_features, layer.out_features = features(layer)


def slice_ffn(module: nn.Module, parts: FFNParts, index: torch.Tensor) -> nn.Module:
    """A copy of ``module`` with only the hidden neurons ``index`` (n,): its up rows, its down columns."""
    piece = copy.deepcopy(module)
    for name in parts.up:
        _cut(piece.get_submodule(name), index, up=True)
    _cut(piece.get_submodule(parts.down), index, up=False)
    if isinstance(getattr(piece, "intermediate_size", None), int):  # LlamaMLP & co. record H
        piece.intermediate_size = index.numel()
    return piece


@torch.no_grad()
def _check_slices(module: nn.Module, parts: FFNParts, slices: List[nn.Module]) -> None:
    """The slices must add up to the module: ``Σ_g f_g(x) - (G-1)·b = f(x)`` on a probe (eval mode)."""
    p = module.get_submodule(parts.up[0]).weight
    x = torch.randn(3, parts.input_dim, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    try:
        with evaluating(module, *slices):
            want = module(x)
            bias = module.get_submodule(parts.down).bias
            got = sum(s(x) for s in slices) - (0 if bias is None else (len(slices) - 1) * bias)
    except Exception as err:  # a forward that needs more than the layers' sizes: say which module
        raise ValueError(f"granularity: {type(module).__name__} does not run with its hidden layers cut "
                         f"({type(err).__name__}: {err})") from err
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 3e-2
    if not (isinstance(want, torch.Tensor) and torch.allclose(got.float(), want.float(), rtol=tol,
                                                              atol=tol * (1 + want.abs().max().item()))):
        raise ValueError(f"granularity: the {len(slices)} slices of {type(module).__name__} do not add up to it: "
                         f"its forward uses more than gate/up -> down along the hidden neurons")


def check_options(granularity, split, drop_fraction) -> None:
    check_int(granularity, "granularity", min=1)
    check_choice(split, "split", SPLITS)
    check_number(drop_fraction, "drop_fraction", low=0, high=1)


def upcycled_experts(module: nn.Module, num_experts: int, granularity: int = 1, split: str = "contiguous",
                     drop_fraction: float = 0.0) -> List[nn.Module]:
    """The E experts of ``module``: deep copies (G = 1), or r = E/G copies of each of the G slices (expert
    ``c·G + g``, down weights × G); then drop-upcycling (:func:`~moefy.convert.drop_upcycling.drop_upcycle`)
    re-initialises ``drop_fraction`` of every expert's neurons (before the × G)."""
    check_module(module, "module")
    check_int(num_experts, "num_experts", min=1)
    check_options(granularity, split, drop_fraction)
    if granularity == 1 and not drop_fraction:
        return [copy.deepcopy(module) for _ in range(num_experts)]
    parts = require_ffn_parts(module, "granularity" if granularity > 1 else "drop_fraction")
    g = granularity
    if num_experts % g:
        raise ValueError(f"num_experts must be a multiple of granularity={g} (r copies of each of the {g} "
                         f"slices), got {num_experts}")
    if parts.hidden % g:
        raise ValueError(f"granularity={g} must divide the hidden size H={parts.hidden} of "
                         f"{type(module).__name__} (H % G = {parts.hidden % g})")
    if g == 1:
        experts = [copy.deepcopy(module) for _ in range(num_experts)]
    else:
        slices = [slice_ffn(module, parts, index) for index in neuron_groups(module, parts, g, split)]
        _check_slices(module, parts, slices)
        experts = [copy.deepcopy(slices[e % g]) for e in range(num_experts)]
    if drop_fraction:
        drop_upcycle(experts, module, drop_fraction)
    if g > 1:
        with torch.no_grad():
            for expert in experts:
                expert.get_submodule(parts.down).weight.mul_(g)
    return experts


@torch.no_grad()
def copy_router_rows(router: nn.Module, num_experts: int, granularity: int) -> None:
    """Row ``c·G + g`` of the router's gate (and selection bias) := row ``c·G``: equal scores for one copy."""
    for t in (router.gate.weight, router.score_correction_bias):
        if t is not None:
            blocks = t[:num_experts].view(num_experts // granularity, granularity, *t.shape[1:])
            blocks.copy_(blocks[:, :1].expand_as(blocks))


def exactness(mixture) -> Tuple[bool, str]:
    """``(exact, why not)``: whether ``mixture`` (a ModuleMixture) now meets the condition of the module
    docstring under which it computes the dense module it was made from."""
    if not isinstance(mixture, MoEBlock):
        raise TypeError(f"mixture must be a MoEBlock (a moefy() mixture), got {type(mixture).__name__}")
    c, g, e = mixture.config, getattr(mixture, "granularity", 1), mixture.num_experts
    reasons = [why for bad, why in (
        (c.expert_choice, "expert_choice"), (not c.normalize, "normalize=False"), (c.hole, "hole=True"),
        (bool(c.null_columns), "null experts"), (c.token_capacity_factor is not None, "token_capacity_factor"),
        (c.noise is not None, f"noise={c.noise!r}"), (c.routed_scaling_factor != 1, "routed_scaling_factor != 1"),
        (c.aggregation != "sum", f"aggregation={c.aggregation!r}"),
        (c.n_group > 1 and c.topk_group not in (None, c.n_group), "group-limited routing"),
        (mixture.shared_experts is not None, "shared experts"),
        (getattr(mixture, "expert_noise", 0) > 0, "expert_noise > 0"),
        (getattr(mixture, "drop_fraction", 0) > 0, "drop_fraction > 0 (re-initialised neurons)"),
        (not (float(c.k).is_integer() and int(c.k) % g == 0), f"k={c.k} is not a multiple of granularity={g}"))
        if bad]
    if g > 1:
        router = mixture.router
        for name, t in (("router rows", router.gate.weight), ("score_correction_bias", router.score_correction_bias)):
            if t is not None:
                blocks = t[:e].view(e // g, g, *t.shape[1:])
                if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
                    reasons.append(f"{name} differ between the {g} slices of a copy")
    return not reasons, "; ".join(reasons)


@torch.no_grad()
def merged_copies(mixture) -> List[nn.Module]:
    """The r = E/G dense modules of a granular mixture: copy c's slices concatenated along the hidden neurons
    (slice order: the original order for ``split='contiguous'``, else a permutation of the neurons, the same
    function), down weights / G and the down bias the mean of the slices' (what the G slices add up to)."""
    if not isinstance(mixture, MoEBlock):
        raise TypeError(f"mixture must be a MoEBlock (a moefy() mixture), got {type(mixture).__name__}")
    g, experts = getattr(mixture, "granularity", 1), list(mixture.experts)
    if g == 1:
        raise ValueError("mixture: not a granular mixture (granularity=1): its experts are whole copies")
    parts = require_ffn_parts(experts[0], "mixture")
    copies = []
    for c in range(len(experts) // g):
        group = experts[c * g:(c + 1) * g]
        dense = copy.deepcopy(group[0])
        for name, up in [(n, True) for n in parts.up] + [(parts.down, False)]:
            layers = [s.get_submodule(name) for s in group]
            layer, dim = dense.get_submodule(name), neuron_dim(layers[0], up)
            w = torch.cat([s.weight.detach() for s in layers], dim=dim) / (1 if up else g)
            layer.weight = nn.Parameter(w, layers[0].weight.requires_grad)
            if layer.bias is not None:
                b = (torch.cat if up else lambda t: torch.stack(t).mean(0))([s.bias.detach() for s in layers])
                layer.bias = nn.Parameter(b, layers[0].bias.requires_grad)
            n = w.shape[dim]
            if is_conv1d(layer):
                layer.nf, layer.nx = (n, layer.nx) if up else (layer.nf, n)
            else:
                layer.in_features, layer.out_features = features(layer)
        if isinstance(getattr(dense, "intermediate_size", None), int):
            dense.intermediate_size = parts.hidden * g
        copies.append(dense)
    return copies


