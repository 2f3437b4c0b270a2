"""Merge groups of similar experts into one: :func:`merge_experts` (HC-SMoE, Chen et al. 2025).

1. calibrate: every expert runs on every routed calibration token; its feature is its mean output over them,
   and its frequency is the number of token slots the router sent it;
2. cluster: per block, average-linkage agglomerative clustering of those features (Euclidean) into ``keep``
   groups, inside each of the router's ``n_group`` expert groups when it has them (HC-SMoE clusters by output,
   so the groups do not depend on one batch's routing decisions);
3. merge: each group becomes one expert whose every floating parameter (and buffer) is the weighted average of
   the group's: weights proportional to the experts' frequencies (``"frequency_weighted"``, M-SMoE / HC-SMoE;
   uniform when no token reached the group) or uniform (``"average"``). The merged expert is the group's
   highest-scoring (dominant) expert with the averaged weights written into its parameters, and it keeps that
   expert's router row, as MC-SMoE's dominant experts and REAM's centroids do: the router is not re-fitted. A
   group of one is that expert, untouched.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Sequence

import torch
from torch import nn

from ..checks import check_choice, check_int, check_tensor
from ..hf.generic import HFExpertsBlock
from .calibrate import calibrate
from .family import merge_family_rows
from .prune import prepare
from .resize import check_resize, expert_groups, resize, sync_hf_config

__all__ = ["MERGE_METHODS", "merge_experts", "cluster_experts", "average_state"]

MERGE_METHODS = ("frequency_weighted", "average")


def cluster_experts(features: torch.Tensor, keep: int, n_group: int = 1) -> List[List[int]]:
    """Average-linkage agglomerative clustering of E experts by ``features`` (E, F) (Euclidean) into ``keep``
    groups, ``keep / n_group`` inside each of ``n_group`` contiguous groups of E / n_group experts. Returns the
    groups (lists of expert indices, each sorted), ordered by their first index. Deterministic: of equal
    distances the first pair (row-major) merges."""
    check_tensor(features, "features", floating=True)
    if features.dim() != 2 or features.shape[0] == 0 or not torch.isfinite(features).all():
        raise ValueError(f"features must be a finite (E, F) tensor, one row per expert, got shape "
                         f"{tuple(features.shape)}")
    E = features.shape[0]
    check_int(n_group, "n_group", min=1)
    check_int(keep, "keep", min=1, max=E)
    if E % n_group or keep % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts ({E}) and keep ({keep})")
    size, per_group = E // n_group, keep // n_group
    groups: List[List[int]] = []
    for g in range(n_group):
        members = _average_linkage(features[g * size:(g + 1) * size].double(), per_group)
        groups += [[g * size + i for i in m] for m in members]
    return sorted(groups, key=lambda m: m[0])


def _average_linkage(features: torch.Tensor, n_clusters: int) -> List[List[int]]:
    n = features.shape[0]
    dist = torch.cdist(features, features)                           # (n, n)
    dist.fill_diagonal_(float("inf"))
    members: List[List[int]] = [[i] for i in range(n)]
    alive = n
    while alive > n_clusters:
        a, b = divmod(int(torch.argmin(dist)), n)
        a, b = min(a, b), max(a, b)
        na, nb = len(members[a]), len(members[b])
        merged = (na * dist[a] + nb * dist[b]) / (na + nb)            # Lance-Williams, average linkage
        dist[a], dist[:, a] = merged, merged
        dist[b], dist[:, b] = float("inf"), float("inf")
        dist[a, a] = float("inf")
        members[a], members[b] = sorted(members[a] + members[b]), []
        alive -= 1
    return [m for m in members if m]


def _weights(frequency: torch.Tensor, method: str) -> List[float]:
    """A group's merge weights: its frequencies normalised (``"frequency_weighted"``; uniform when all are 0), or
    uniform (``"average"``)."""
    if method == "average" or frequency.sum() == 0:
        return [1.0 / len(frequency)] * len(frequency)
    return (frequency / frequency.sum()).tolist()


@torch.no_grad()
def average_state(modules: Sequence[nn.Module], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """``Σ_i weights[i] · modules[i].state_dict()`` for the floating entries (computed in float64, stored in each
    entry's dtype), the first module's value for the others. The modules must have the same state-dict names and
    shapes (ValueError otherwise)."""
    states = [m.state_dict() for m in modules]
    merged = {}
    for name, tensor in states[0].items():
        if any(name not in s or s[name].shape != tensor.shape for s in states) or any(len(s) != len(states[0])
                                                                                       for s in states):
            raise ValueError(f"experts to merge must have the same parameters: {name!r} is missing or has another "
                             f"shape in one of them")
        merged[name] = tensor.clone() if not tensor.is_floating_point() else \
            sum(float(w) * s[name].to(torch.float64) for w, s in zip(weights, states)).to(tensor.dtype)
    return merged


def merge_experts(model: nn.Module, keep, scores: Mapping[str, torch.Tensor], data: Iterable[Any],
                  method: str = "frequency_weighted") -> Dict[str, List[List[int]]]:
    """Merge the experts of every MoE block of ``model`` into ``keep`` experts, in place (see the module
    docstring).

    Args:
        model: a moefied model or one imported by :func:`moefy.hf.from_hf` (a RoutingConfig family).
        keep: experts per block after merging, as in :func:`~moefy.compress.prune_experts`: an int, a fraction
            in (0, 1], ``{block name: int}`` or a list; in [k, E].
        scores: ``{block name: (E,)}`` (:func:`~moefy.compress.expert_scores`): picks each group's dominant
            expert, whose router row the merged expert keeps.
        data: calibration inputs, as for :func:`~moefy.compress.expert_scores`; each block runs all its experts
            on every routed token (E times its usual expert work).
        method: ``"frequency_weighted"`` or ``"average"``.
    Returns:
        ``{block name: groups}``: for merged expert i, the old indices of the experts it merged.
    Raises:
        ValueError: as :func:`~moefy.compress.prune_experts`, an unknown ``method``, experts of different shapes
            in one group, a block that ``data`` does not reach. Nothing is changed then.
    """
    check_choice(method, "method", MERGE_METHODS)
    blocks, before, counts, scores = prepare(model, keep, scores)
    stats = calibrate(model, data, outputs=True)
    unreached = [name for name, s in stats.items() if s.tokens == 0]
    if unreached:
        raise ValueError(f"data reached no token of blocks {unreached[:4]}: merging clusters experts by their outputs "
                         f"on the calibration tokens; pass data that runs through every MoE block")
    plans = {}
    for name, block in blocks.items():
        s = stats[name]
        groups = cluster_experts(s.output_sum / s.tokens, counts[name], expert_groups(block))
        dominants = [max(group, key=lambda i: (float(scores[name][i]), -i)) for group in groups]
        weights = [_weights(s.frequency[group], method) for group in groups]
        family = isinstance(block, HFExpertsBlock)  # its experts are rows of the family's stacked tensors
        merged = [None if len(group) == 1 or family else average_state([block.experts[i] for i in group], w)
                  for group, w in zip(groups, weights)]
        check_resize(model, name, block, dominants)
        plans[name] = (groups, dominants, weights, merged)
    for name, block in blocks.items():  # every block planned (and every error raised) before any changes
        groups, dominants, weights, merged = plans[name]
        if isinstance(block, HFExpertsBlock):
            merge_family_rows(block, groups, weights, dominants)
        for dominant, state in zip(dominants, merged):
            if state is not None:  # in place: the dominant expert's parameters keep their identity
                block.experts[dominant].load_state_dict(state)
        resize(model, name, block, dominants)
    sync_hf_config(model, blocks, before)
    return {name: plan[0] for name, plan in plans.items()}
