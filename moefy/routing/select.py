"""Selection strategies: from the router's scores to (token, column) assignments.

A strategy is a function ``(probs (T, E'), config, num_experts, subset=None) -> Selection``; :data:`SELECTIONS`
names them and :func:`select` picks the config's. ``subset`` is a sampler's choice of columns (SIMPLE's k-hot
(T, E'), in training), used instead of the strategy's own picks where it applies. Every strategy hands back its assignments grouped by column
(column order, tokens in order inside a column), so dispatch can cut them into contiguous slices, and says
how many token slots it dropped. Shapes as in :mod:`moefy.routing.record`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..config import RoutingConfig
from ..fastpaths import NO_DROPS, count_ids, top_k


@dataclass(frozen=True)
class Selection:
    """What a strategy picked.

    Attributes:
        mode: the strategy's name (``"token_choice"``, ``"expert_choice"``).
        indices: token choice: (T, k) columns per token, best first; expert choice: (E', C) tokens per column.
        weights: same shape as ``indices``: the combine weight of each pick.
        token_index, expert_index, weight: (A,) the picks as assignments, grouped by column.
        count: (E',) long, assignments per column, on the device.
        dropped: 0-dim long, token slots no real expert processes.
        host_counts: ``count`` as host ints where the strategy knows them without a device read, else None.
    """

    mode: str
    indices: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    dropped: torch.Tensor
    host_counts: Optional[Tuple[int, ...]] = None


def token_choice(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
                 subset: Optional[torch.Tensor] = None) -> Selection:
    """Each token picks its top-k columns, or the k columns of a sampled ``subset`` (T, E') k-hot whose
    gradient is the sampler's (SIMPLE: the exact marginals'), which then flows into the weights.

    With ``config.normalize`` the k weights are renormalised to sum to one. At k = 1 that weight is the
    constant 1, which would give the router no gradient, so it is ``p / stopgrad(p)``: value exactly 1,
    gradient that of ``p`` (straight-through)."""
    if subset is None:
        vals, idx = top_k(probs, config.k)                                  # (T, k) each
    else:  # the sampled columns, best first; weight p · z: value p, gradient of p plus p times z's
        _, idx = top_k(probs.detach().masked_fill(subset.detach() == 0, -1.0), config.k)
        vals = probs.gather(-1, idx) * subset.gather(-1, idx).to(probs.dtype)
    return from_picks(idx, combine_weights(vals, config), probs.shape[1], num_experts, config.hole)


def combine_weights(vals: torch.Tensor, config: RoutingConfig) -> torch.Tensor:
    """The picked scores (T, k) as combine weights: renormalised to sum to one with ``config.normalize``
    (at k = 1 straight-through, ``p / stopgrad(p)``), else unchanged."""
    if config.normalize:
        vals = vals / vals.detach() if config.k == 1 else vals / vals.sum(dim=-1, keepdim=True)
    return vals


def from_picks(indices: torch.Tensor, weights: torch.Tensor, num_columns: int, num_experts: int,
               hole: bool) -> Selection:
    """Token-choice picks (T, k) as a selection: one stable sort groups the assignments by column; slots
    sent to the hole (column E) are the dropped ones."""
    token_index, expert_index, weight = group_by_column(indices, weights)  # (T*k,) each
    count = count_ids(expert_index, num_columns)                             # (E',)
    host_counts = None if count.is_cuda else tuple(count.tolist())          # on a GPU: read back when needed
    dropped = count[num_experts] if hole else NO_DROPS
    return Selection("token_choice", indices, weights, token_index, expert_index, weight, count, dropped,
                     host_counts)


def group_by_column(indices: torch.Tensor, weights: torch.Tensor):
    """Flatten picks (T, k) into assignments grouped by column with one stable sort:
    ``(token_index, expert_index, weight)``, each (T*k,); tokens keep their order inside a column."""
    k = indices.shape[1]
    expert_index, order = indices.reshape(-1).sort(stable=True)
    token_index = order if k == 1 else torch.div(order, k, rounding_mode="floor")
    return token_index, expert_index, weights.reshape(-1).index_select(0, order)


def expert_capacity(num_tokens: int, num_columns: int, k: float, capacity_factor: float,
                    capacity: Optional[int] = None) -> int:
    """C = ``capacity`` if given, else ``ceil(capacity_factor * T * k / E')``; never more than T."""
    c = capacity if capacity is not None else math.ceil(capacity_factor * num_tokens * k / num_columns)
    return min(int(c), num_tokens)


def expert_choice(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
                  subset: Optional[torch.Tensor] = None) -> Selection:
    """Each column picks its top-C tokens (Zhou et al. 2022); weights are the raw scores. Tokens that no
    real expert picked are the dropped ones."""
    num_tokens, num_columns = probs.shape
    c = expert_capacity(num_tokens, num_columns, config.k, config.capacity_factor, config.capacity)
    vals, tok = probs.t().topk(c, dim=-1)                                   # (E', C) each
    expert_index = torch.arange(num_columns, device=probs.device).repeat_interleave(c)
    covered = torch.zeros(num_tokens, dtype=torch.bool, device=probs.device)
    covered[tok[:num_experts].reshape(-1)] = True
    count = torch.full((num_columns,), c, dtype=torch.long, device=probs.device)
    return Selection("expert_choice", tok, vals, tok.reshape(-1), expert_index, vals.reshape(-1), count,
                     num_tokens - covered.sum(), (c,) * num_columns)


Strategy = Callable[[torch.Tensor, RoutingConfig, int, Optional[torch.Tensor]], Selection]
SELECTIONS: Dict[str, Strategy] = {"token_choice": token_choice, "expert_choice": expert_choice}


def select(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
           subset: Optional[torch.Tensor] = None) -> Selection:
    """The config's strategy applied to ``probs`` (T, E') (and a sampler's ``subset``)."""
    strategy = SELECTIONS["expert_choice" if config.expert_choice else "token_choice"]
    return strategy(probs, config, num_experts, subset)
