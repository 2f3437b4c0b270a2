"""Selection strategies: from the router's scores to (token, column) assignments.

A strategy is a function ``(probs (T, E'), config, num_experts, subset=None, bias=None) -> Selection``;
:data:`SELECTIONS` names them and :func:`select` picks the config's. ``subset`` is a sampler's choice of columns
(SIMPLE's k-hot (T, E'), in training), used instead of the strategy's own picks where it applies. ``bias`` (E')
is the router's selection bias (DeepSeek-V3's ``e_score_correction_bias``): added to the scores to choose,
never to the combine weights, which are always taken from ``probs``. Every strategy hands back its
assignments grouped by column (column order, tokens in order inside a column), so dispatch can cut them into
contiguous slices, and says
how many token slots it dropped. Token choice with a capacity (``token_capacity_factor``) then caps each
real column with :func:`cap_columns`: the assignments over capacity leave the list and count as dropped, so
the record and dispatch see an ordinary selection. Shapes as in :mod:`moefy.routing.record`.

**Non-finite scores.** A token whose scores are not all finite (a NaN or ±inf in its input or the router's
weights; :func:`nonfinite_as_nan` gives every score of a token NaN once one of its logits is not finite) is
routed nowhere, in every strategy: its picks never compete with a finite token's (its scores count as the
lowest for every ranking: top-k, groups, capacity with either drop policy, an expert's top-C), its combine
weights are NaN, and its k slots (token choice) leave the assignments and count in ``dropped``: the counts
are the finite tokens' and ``sum(load) + null_slots + dropped == T·k`` still holds. ``Selection.finite`` (T,) says
which tokens were routed; the record keeps it, dispatch gives the others a NaN output (the NaN stays visible
in the loss, as in a dense layer, and never reaches another token), and the aux losses and statistics leave
them out. All of it is computed on the device: no host synchronisation, no error. The assignments of a
non-finite token are moved behind every column's (sorted past the last column); where the counts are already
on the host (CPU) they are cut off at once, else the tail stays listed under the last column, outside
``count``, until the record's counts are read (see :class:`~moefy.routing.record.Routing`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..config import RoutingConfig
from ..fastpaths import NO_DROPS, all_finite, count_ids, top_k


@dataclass(frozen=True)
class Selection:
    """What a strategy picked.

    Attributes:
        mode: the strategy's name (``"token_choice"``, ``"expert_choice"``).
        indices: token choice: (T, k) columns per token, best first (before capacity drops); expert choice:
            (E', C) tokens per column.
        weights: same shape as ``indices``: the combine weight of each pick.
        token_index, expert_index, weight: (A,) the kept picks as assignments, grouped by column.
        count: (E',) long, assignments per column, on the device.
        dropped: 0-dim long, token slots no real expert processes (sent to the hole or a zero null expert,
            over capacity, or of a non-finite token).
        host_counts: ``count`` as host ints where the strategy knows them without a device read, else None.
        picked_count: (E',) assignments per column before capacity drops; None when nothing was capped
            (then it is ``count``).
        finite: (T,) bool, the tokens routed; a token with a non-finite score or combine weight is not
            (its slots count in ``dropped``; see the module docstring). None: not checked, all routed.

    ``token_index``, ``expert_index`` and ``weight`` list the ``sum(count)`` assignments; while ``host_counts``
    is None they may go on with the slots of non-finite tokens (listed under the last column, in no count).
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
    picked_count: Optional[torch.Tensor] = None
    finite: Optional[torch.Tensor] = None


def nonfinite_as_nan(scores: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """The router's ``(logits, noisy_logits, noise_std, probs)`` with every score (probs) NaN in the rows
    whose noisy logits are not all finite: with a sigmoid, a ±inf logit scores a finite 1 or 0, and with a
    softmax a -inf one a finite 0, yet the token's input (or the gate) is not finite. (A score that is not
    finite itself, the strategies see directly.)"""
    logits, noisy, std, probs = scores
    if all_finite(noisy):  # nothing to mark (told without a per-row pass where that is free: CPU)
        return logits, noisy, std, probs
    return logits, noisy, std, torch.where(noisy.isfinite().all(dim=-1, keepdim=True), probs, float("nan"))


def finite_rows(probs: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the rows of ``probs`` (T, E') whose scores are all finite."""
    return probs.detach().isfinite().all(dim=-1)


def finite_rows_or_none(probs: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`finite_rows`, or None where every score is finite and that is known for free (CPU,
    :func:`~moefy.fastpaths.all_finite`): the per-row masking then has nothing to do."""
    return None if all_finite(probs) else finite_rows(probs)


def ranking_scores(probs: torch.Tensor, finite: Optional[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """``probs`` (T, E') detached, with the rows of non-finite tokens (``~finite`` (T,); None: none) set to
    ``fill``: what a strategy ranks, so a NaN (which ``topk`` and ``sort`` rank highest) never wins a place."""
    return probs.detach() if finite is None else torch.where(finite[:, None], probs.detach(), fill)


def token_choice(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
                 subset: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> Selection:
    """Each token picks its top-k columns (by ``probs + bias`` with a selection bias), or the k columns of a
    sampled ``subset`` (T, E') k-hot whose gradient is the sampler's (SIMPLE: the exact marginals'), which
    then flows into the weights. Weights: :func:`combine_weights` of the picked ``probs``. With
    ``config.token_capacity_factor`` each real expert then keeps at most C of its assignments
    (:func:`cap_columns`); the weights are not renormalised after that."""
    if subset is None and bias is None:  # plain top-k: nothing to mask. Scores are in [0, 1] or NaN
        # (nonfinite_as_nan) and top-k picks a NaN first, so a non-finite token's weights are NaN and from_picks
        # routes it nowhere (its indices are placeholders), with no per-row pass when every score is finite
        vals, idx = top_k(probs, config.k)                                     # (T, k) each
        weights = combine_weights(vals, config)                                # (T, k)
        return with_capacity(from_picks(idx, weights, probs.shape[1], num_experts, config.zero_columns), probs,
                             config, num_experts)
    finite = finite_rows_or_none(probs)                                      # (T,) or None: all finite
    choice = ranking_scores(probs, finite)                                   # (T, E'), non-finite rows 0
    if subset is not None:  # the sampled columns, best first; weight p · z: value p, gradient of p plus p times z's
        _, idx = top_k(choice.masked_fill(subset.detach() == 0, -1.0), config.k)
        vals = probs.gather(-1, idx) * subset.gather(-1, idx).to(probs.dtype)
    elif bias is not None:  # biased scores may be negative: plain topk, not the fast path for scores >= 0
        idx = (choice + bias.to(probs.dtype)).topk(config.k, dim=-1).indices  # (T, k)
        vals = probs.gather(-1, idx)                                           # (T, k)
    else:
        _, idx = top_k(choice, config.k)                                       # (T, k)
        vals = probs.gather(-1, idx)                                           # (T, k), the gradient of topk's
    weights = nonfinite_weights(combine_weights(vals, config), finite)
    picked = from_picks(idx, weights, probs.shape[1], num_experts, config.zero_columns)
    return with_capacity(picked, probs, config, num_experts)


def nonfinite_weights(weights: torch.Tensor, finite: Optional[torch.Tensor]) -> torch.Tensor:
    """Token-choice ``weights`` (T, k) with the rows of non-finite tokens (``~finite`` (T,); None: none) NaN:
    how :func:`from_picks` (and a replay of them) knows the tokens to route nowhere."""
    return weights if finite is None else torch.where(finite[:, None], weights, float("nan"))


def group_limited_token_choice(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
                               subset: Optional[torch.Tensor] = None,
                               bias: Optional[torch.Tensor] = None) -> Selection:
    """DeepSeek-V3's group-limited top-k (``DeepseekV3TopkRouter``): the E experts form ``n_group`` groups of
    E/G consecutive columns; each token scores a group by the sum of its top-2 selection scores
    (``probs + bias``; top-1 for groups of one expert), keeps its ``topk_group`` best groups and picks its top-k
    experts inside them. Weights: :func:`combine_weights` of the picked, unbiased ``probs``. No hole, no sampler."""
    if subset is not None:
        raise ValueError("group-limited routing (n_group > 1) cannot take a sampler's subset (noise='simple')")
    num_tokens, num_columns = probs.shape                                  # no hole: E' = E
    groups, size = config.n_group, num_columns // config.n_group
    finite = finite_rows_or_none(probs)                                    # (T,) or None: all finite
    choice = ranking_scores(probs, finite)                                 # (T, E), non-finite rows 0
    choice = choice if bias is None else choice + bias.to(probs.dtype)
    group_scores = choice.view(num_tokens, groups, size).topk(min(2, size), dim=-1).values.sum(-1)  # (T, G)
    best = group_scores.topk(config.topk_group or groups, dim=-1).indices                         # (T, G_kept)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)               # (T, G)
    choice = choice.masked_fill(~kept.repeat_interleave(size, dim=1), float("-inf"))              # (T, E)
    idx = choice.topk(config.k, dim=-1).indices                                                   # (T, k)
    weights = nonfinite_weights(combine_weights(probs.gather(-1, idx), config), finite)
    picked = from_picks(idx, weights, num_columns, num_experts, False)
    return with_capacity(picked, probs, config, num_experts)


def combine_weights(vals: torch.Tensor, config: RoutingConfig) -> torch.Tensor:
    """The token-choice combine weights of the picked scores ``vals`` (T, k): renormalised to sum to one with
    ``config.normalize``, then times ``config.routed_scaling_factor``.

    At k = 1 the renormalised weight is the constant 1, which would give the router no gradient, so it is
    ``p / stopgrad(p)``: value exactly 1, gradient that of ``p`` (straight-through). DeepSeek-V3 divides by
    ``sum + 1e-20`` instead: the same values in float32 for any sum above ~1e-13."""
    if config.normalize:
        vals = vals / vals.detach() if config.k == 1 else vals / vals.sum(dim=-1, keepdim=True)
    return vals * config.routed_scaling_factor if config.routed_scaling_factor != 1.0 else vals


def with_capacity(picked: Selection, probs: torch.Tensor, config: RoutingConfig, num_experts: int) -> Selection:
    """``picked`` capped at ``C = ceil(token_capacity_factor · T · k / E)`` per real expert, if configured."""
    if config.token_capacity_factor is None:
        return picked
    capacity = expert_capacity(probs.shape[0], num_experts, config.k, config.token_capacity_factor)
    return cap_columns(picked, probs, capacity, num_experts, config.drop_policy)


def from_picks(indices: torch.Tensor, weights: torch.Tensor, num_columns: int, num_experts: int,
               hole: Union[bool, int]) -> Selection:
    """Token-choice picks (T, k) as a selection: one stable sort groups the assignments by column; slots
    sent to the last ``hole`` columns (True: one, the hole; an int: the zero null experts plus the hole,
    ``config.zero_columns``) are the dropped ones, and so are all k slots of a token whose ``weights`` row is
    not finite (a non-finite token, routed nowhere: sorted behind every column and counted in no column)."""
    zeros = int(hole)
    if all_finite(weights):  # every slot counts (known for free on CPU): no "nowhere" column to sort behind
        token_index, column, weight = group_by_column(indices, weights)     # (T*k,) each
        count = count_ids(column, num_columns)                               # (E',)
        dropped = count[num_columns - zeros:].sum() if zeros else NO_DROPS
        return Selection("token_choice", indices, weights, token_index, column, weight, count, dropped,
                         host_counts(count, num_columns))
    finite = weights.detach().isfinite().all(dim=-1)                         # (T,)
    column = torch.where(finite[:, None], indices, num_columns)              # (T, k), num_columns: nowhere
    token_index, column, weight = group_by_column(column, weights)          # (T*k,) each
    count = count_ids(column, num_columns + 1)                               # (E' + 1,): the last, nowhere
    host = host_counts(count, num_columns)                                   # on a GPU: read back when needed
    nowhere, count = count[num_columns], count[:num_columns]                 # 0-dim, (E',)
    dropped = nowhere + count[num_columns - zeros:].sum() if zeros else nowhere
    return listed(Selection("token_choice", indices, weights, token_index, column.clamp(max=num_columns - 1),
                            weight, count, dropped, host, finite=finite))


def listed(selection: Selection) -> Selection:
    """``selection`` with its assignment lists cut to the ``sum(count)`` counted ones when its host counts
    are known (the non-finite tokens' slots behind them leave); unchanged otherwise."""
    if selection.host_counts is None:
        return selection
    n = sum(selection.host_counts)
    if selection.token_index.shape[0] == n:
        return selection
    return dataclasses.replace(selection, token_index=selection.token_index[:n],
                               expert_index=selection.expert_index[:n], weight=selection.weight[:n])


def host_counts(count: torch.Tensor, num_columns: int) -> Optional[Tuple[int, ...]]:
    """The first ``num_columns`` of ``count`` as host ints where reading them costs no synchronisation
    (CPU); None on a GPU, where the record reads them back only when something needs them."""
    return None if count.is_cuda else tuple(count.tolist()[:num_columns])


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


def cap_columns(selection: Selection, probs: torch.Tensor, capacity: int, num_experts: int,
                policy: str = "probs") -> Selection:
    """A token-choice selection with at most ``capacity`` assignments per real column (the hole and the null
    experts are never capped). ``policy`` says which an over-full column keeps: ``"probs"``: the highest scores
    ``probs`` (T, E') of the picks (ties: earlier tokens; a non-finite score ranks last); ``"position"``: the
    earliest tokens. The others leave the assignment list (so nothing downstream runs or counts them) and are
    added to ``dropped``; ``indices`` / ``weights`` keep the picks as made. Keeps the column grouping and the
    token order inside a column. The slots of non-finite tokens (listed past ``sum(count)``, if any) leave too,
    already counted in ``dropped``."""
    col, count = selection.expert_index, selection.count                     # (A,), (E',)
    if capacity >= probs.shape[0] or col.numel() == 0:                       # nothing can overflow
        return selection
    start = count.cumsum(0) - count                                          # (E',) first slot of each column
    place = torch.arange(col.numel(), device=col.device)                     # (A,)
    counted = place < count.sum()                                            # (A,) False: a non-finite tail
    if policy == "position":  # the column's slice is in token order already
        rank = place - start[col]                                            # (A,)
    else:  # best first inside each column: a stable sort by score, then a stable one by column
        score = probs.detach()[selection.token_index, col]                   # (A,)
        score = score.masked_fill(~(counted & score.isfinite()), float("-inf"))  # NaN would sort first
        by_score = score.argsort(descending=True, stable=True)
        order = by_score.index_select(0, col.index_select(0, by_score).argsort(stable=True))
        rank = torch.empty_like(place).index_copy_(0, order, place - start[col])  # col[order] == col
    keep = ((rank < capacity) | (col >= num_experts)) & counted             # (A,) bool
    capped = count.clone()                                                   # (E',)
    capped[:num_experts].clamp_(max=capacity)
    over = (count[:num_experts] - capacity).clamp(min=0).sum()               # 0-dim
    host = None if selection.host_counts is None else tuple(
        min(n, capacity) if e < num_experts else n for e, n in enumerate(selection.host_counts))
    return dataclasses.replace(selection, token_index=selection.token_index[keep], expert_index=col[keep],
                               weight=selection.weight[keep], count=capped, dropped=selection.dropped + over,
                               host_counts=host, picked_count=count)


def expert_choice(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
                  subset: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> Selection:
    """Each column picks its top-C tokens (Zhou et al. 2022); weights are the raw scores times
    ``routed_scaling_factor``. Tokens that no real expert picked are the dropped ones. A per-column ``bias``
    would not change which tokens a column takes, so expert choice has none (the config refuses it).
    Non-finite tokens rank below every finite one, so a column takes one only where it has more places than
    finite tokens; such a pick is not an assignment (it leaves the lists and ``count``, its weight is NaN) and
    the token counts as dropped."""
    num_tokens, num_columns = probs.shape
    c = expert_capacity(num_tokens, num_columns, config.k, config.capacity_factor, config.capacity)
    finite = finite_rows(probs)                                             # (T,)
    tok = ranking_scores(probs, finite, float("-inf")).t().topk(c, dim=-1).indices  # (E', C)
    vals = probs.t().gather(-1, tok)                                        # (E', C), the gradient of topk's
    if config.routed_scaling_factor != 1.0:
        vals = vals * config.routed_scaling_factor
    picked_finite = finite[tok]                                             # (E', C)
    vals = vals.masked_fill(~picked_finite, float("nan"))
    column = torch.arange(num_columns, device=probs.device).repeat_interleave(c)  # (E'·C,)
    column = column.masked_fill(~picked_finite.reshape(-1), num_columns)    # non-finite picks: nowhere
    column, order = column.sort(stable=True)
    count = count_ids(column, num_columns + 1)                               # (E' + 1,): the last, nowhere
    host = host_counts(count, num_columns)                                   # on a GPU: read back when needed
    count = count[:num_columns]                                              # (E',)
    covered = torch.zeros(num_tokens, dtype=torch.bool, device=probs.device)
    covered[tok[:num_experts].reshape(-1)] = True
    dropped = num_tokens - (covered & finite).sum()
    return listed(Selection("expert_choice", tok, vals, tok.reshape(-1).index_select(0, order),
                            column.clamp(max=num_columns - 1), vals.reshape(-1).index_select(0, order), count,
                            dropped, host, finite=finite))


Strategy = Callable[..., Selection]  # (probs, config, num_experts, subset=None, bias=None) -> Selection
SELECTIONS: Dict[str, Strategy] = {"token_choice": token_choice, "expert_choice": expert_choice,
                                   "group_limited_token_choice": group_limited_token_choice}


def strategy_name(config: RoutingConfig) -> str:
    """The name in :data:`SELECTIONS` of the config's strategy."""
    if config.expert_choice:
        return "expert_choice"
    return "group_limited_token_choice" if config.n_group > 1 else "token_choice"


def select(probs: torch.Tensor, config: RoutingConfig, num_experts: int,
           subset: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> Selection:
    """The config's strategy applied to ``probs`` (T, E') (a sampler's ``subset``, the router's selection
    ``bias`` (E'))."""
    return SELECTIONS[strategy_name(config)](probs, config, num_experts, subset, bias)
