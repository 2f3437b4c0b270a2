"""Sort-based sparse dispatch: each expert runs only on its own tokens.

The routing record already lists assignments grouped by router column, so dispatch is one gather into
contiguous per-expert slices, one call per expert that received tokens, one weighted ``index_add_`` back
into token order. The hole is the last column, so its assignments are a tail that is simply never run. Homogeneous experts
may instead run fused (:mod:`moefy.dispatch.fused`): one pass per layer over all experts' rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .fused import Layout, fused_experts_forward, runs_grouped
from ..routing.record import Routing
from ..routing.select import count_ids

AGGREGATIONS = ("sum", "mean")
# Up to this many output elements the combine accumulates with index_put_: 2.5 µs against index_add_'s 9 µs
# for 2 rows of 512, but its sort-based kernel costs 5-20x index_add_ from ~32k elements (torch 2.13 CPU).
_SMALL = 16384


def check_expert_output(out, expert_id: int, rows: int, like: torch.Tensor = None) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"expert_forward of expert {expert_id} returned {type(out).__name__}; it must return one tensor "
            f"with the expert's tokens on dim 0 (override expert_forward to pick the tensor out)")
    if out.dim() == 0 or out.shape[0] != rows or (like is not None and out.shape[1:] != like.shape[1:]):
        want = f"({rows}, ...)" if like is None else str((rows, *like.shape[1:]))
        raise ValueError(
            f"expert_forward of expert {expert_id} returned shape {tuple(out.shape)}, expected {want}: "
            f"one output row per input token, the same trailing shape for every expert")
    return out


def zero_grad_path(y: torch.Tensor, experts: Sequence[nn.Module], idle: Sequence[int]) -> torch.Tensor:
    """Add ``0 * sum(params)`` of the idle experts to ``y``: unchanged values, but their parameters get
    zero gradients instead of None (DDP requires every parameter to take part in backward)."""
    if not torch.is_grad_enabled():
        return y
    params = [p for e in idle for p in experts[e].parameters() if p.requires_grad]
    if not params:
        return y
    return y + torch.stack([p.sum() for p in params]).sum().to(y.dtype) * 0


def dispatch_combine(x: torch.Tensor, routing: Routing,
                     run_expert: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                     experts: Sequence[nn.Module], aggregation: str = "sum",
                     fused: Optional[Layout] = None) -> torch.Tensor:
    """Route ``x`` through the experts and combine the weighted outputs.

    Args:
        x: (T, *F) tokens (or whole samples) in routing order.
        routing: the record for these T rows.
        run_expert: ``run_expert(e, x_e, rows_e)`` with x_e (n_e, *F) the expert's rows and rows_e (n_e,)
            their indices in ``x`` (to gather per-row side inputs) → (n_e, *F_out).
        experts: the E expert modules (for the zero-gradient path of idle experts).
        aggregation: ``"sum"``: ``y_t = sum_i w_ti f_i(x_t)``; ``"mean"``: that sum divided by the number
            of real experts that processed token t (tokens nobody processed stay zero).
        fused: a :func:`moefy.dispatch.fused.fused_layout` of ``experts``: run them all at once on (T, D) rows
            instead of calling ``run_expert`` per expert (the caller vouches that it is plain ``expert(x)``).
    Returns:
        y: (T, *F_out).
    """
    num_tokens, num_experts = x.shape[0], routing.num_experts
    token_index = routing.token_index
    if (fused is not None and x.dim() == 2 and routing.mode == "token_choice" and not routing.hole
            and runs_grouped(experts, fused, x)):
        # every assignment reaches a real expert and grouped mm finds the expert boundaries on the device: no
        # host counts, so no synchronisation; idle experts get zero gradients through the stacked weights
        counts, assigned = None, token_index.shape[0]
    else:
        counts = routing.counts[:num_experts]
        assigned = sum(counts)
    if token_index.shape[0] != assigned:  # the hole's assignments are the tail: never run
        token_index = token_index[:assigned]
    if assigned == 0:  # every token dropped, or no tokens: one empty call to learn the output shape
        empty = check_expert_output(run_expert(0, x[:0], token_index), 0, 0)
        return zero_grad_path(empty.new_zeros((num_tokens, *empty.shape[1:])), experts, range(num_experts))

    rows = x.index_select(0, token_index)  # index_select: cheaper than x[idx] forward and backward on CPU
    if fused is not None and x.dim() == 2:
        out = fused_experts_forward(experts, fused, rows, counts, routing.expert_index[:assigned])
    else:
        out = _run_each(rows, token_index, counts, run_expert)
    weight = routing.weight if routing.weight.shape[0] == assigned else routing.weight[:assigned]
    y = combine(out, token_index, weight, num_tokens, aggregation)
    if counts is not None and 0 in counts and torch.is_grad_enabled():
        y = zero_grad_path(y, experts, [e for e, n in enumerate(counts) if n == 0])
    return y


def combine(out: torch.Tensor, token_index: torch.Tensor, weight: torch.Tensor, num_tokens: int,
            aggregation: str = "sum") -> torch.Tensor:
    """Weighted sum of expert outputs back into token order.

    Args:
        out: (A, *F_out) expert outputs, one row per assignment.
        token_index: (A,) token of each row.
        weight: (A,) combine weight of each row.
        num_tokens: T.
        aggregation: ``"sum"``, or ``"mean"`` (divided by the number of rows each token received).
    Returns:
        y: (T, *F_out); tokens with no row are zero.
    """
    if weight.dtype != out.dtype:
        weight = weight.to(out.dtype)
    if aggregation == "mean":
        per_token = count_ids(token_index, num_tokens).clamp_(min=1)
        weight = weight / per_token.index_select(0, token_index).to(out.dtype)
    out = out * weight.reshape((-1,) + (1,) * (out.dim() - 1))
    y = out.new_zeros((num_tokens, *out.shape[1:]))
    if out.numel() <= _SMALL and not out.is_cuda:  # CPU, a few rows: index_put_ costs a third of index_add_
        return y.index_put_((token_index,), out, accumulate=True)
    return y.index_add_(0, token_index, out)


def _run_each(rows: torch.Tensor, token_index: torch.Tensor, counts: Sequence[int],
              run_expert: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One ``run_expert`` call per expert with tokens, outputs concatenated in expert order: (A, *F_out)."""
    chunks, row_ids = rows.split_with_sizes(counts), token_index.split_with_sizes(counts)
    outs = []
    for e, n in enumerate(counts):
        if n:
            outs.append(check_expert_output(run_expert(e, chunks[e], row_ids[e]), e, n, outs[0] if outs else None))
    return torch.cat(outs) if len(outs) > 1 else outs[0]
