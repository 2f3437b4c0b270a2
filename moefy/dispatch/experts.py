"""The expert-execution seam: "run these rows, grouped by expert, through their experts".

Every implementation is called as ``experts(rows, token_index, routing, run_expert)`` with

- ``rows`` (A, *F): the assigned rows, grouped by expert (``routing.expert_index[:A]`` order);
- ``token_index`` (A,): the token each row came from (to slice per-token side inputs);
- ``routing``: the record (its counts tell where each expert's slice starts);
- ``run_expert(e, x_e, token_ids_e) -> (n_e, *F_out)``: how one expert runs on its rows (the block's
  ``expert_forward`` with the call's side inputs),

and returns (A, *F_out), row i the output of row i's expert. Experts that get no rows still take part in
backward with zero gradients (not None: DDP requires every parameter to be used).

- :class:`LoopedExperts`: one ``run_expert`` call per expert with rows, on its contiguous slice.
- :class:`FusedExperts`: identical Linear / MLP experts as one pass per layer (:mod:`moefy.dispatch.fused`).
- :class:`moefy.parallel.ExpertParallelExperts`: the experts sharded over ranks, rows exchanged all-to-all.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..routing.record import Routing
from .fused import Layout, fused_experts_forward, runs_grouped

RunExpert = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def check_expert_output(out, expert_id: int, rows: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` if it is one tensor with ``rows`` rows (and ``like``'s trailing shape), else a clear error."""
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


def zero_grad_path(y: torch.Tensor, experts: Sequence[nn.Module], idle: Iterable[int]) -> torch.Tensor:
    """``y`` plus ``0 * sum(params)`` of the ``idle`` experts: unchanged values, but their parameters get zero
    gradients instead of None."""
    if not torch.is_grad_enabled():
        return y
    params = [p for e in idle for p in experts[e].parameters() if p.requires_grad]
    if not params:
        return y
    return y + torch.stack([p.sum() for p in params]).sum().to(y.dtype) * 0


def run_slices(rows: torch.Tensor, token_index: torch.Tensor, counts: Sequence[int], run_expert: RunExpert,
               expert_ids: Sequence[int], experts: Sequence[nn.Module]) -> torch.Tensor:
    """``rows`` (A, *F) cut into ``counts[j]`` rows for expert ``expert_ids[j]``, each slice through
    ``run_expert``; outputs concatenated in order: (A, *F_out). With no rows at all, one empty call to learn
    the output shape."""
    if rows.shape[0] == 0:
        e = expert_ids[0]
        empty = check_expert_output(run_expert(e, rows, token_index), e, 0)
        return zero_grad_path(empty, experts, range(len(experts)))
    outs = []
    for e, x_e, ids_e, n in zip(expert_ids, rows.split_with_sizes(counts), token_index.split_with_sizes(counts),
                                counts):
        if n:
            outs.append(check_expert_output(run_expert(e, x_e, ids_e), e, n, outs[0] if outs else None))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if 0 in counts:
        out = zero_grad_path(out, experts, [j for j, n in enumerate(counts) if n == 0])
    return out


class LoopedExperts:
    """One ``run_expert`` call per expert that received rows, on its contiguous slice."""

    def __init__(self, experts: Sequence[nn.Module]):
        self.experts = experts

    def __call__(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing,
                 run_expert: RunExpert) -> torch.Tensor:
        counts = routing.counts[:routing.num_experts]
        return run_slices(rows, token_index, counts, run_expert, range(len(counts)), self.experts)


class FusedExperts:
    """Identical Linear / ``Sequential(Linear, act, ..., Linear)`` experts, one pass per layer over all rows
    (``run_expert`` is only used for a call with no rows). Needs 2-D rows: (A, D)."""

    def __init__(self, experts: Sequence[nn.Module], layout: Layout):
        self.experts, self.layout = experts, layout

    def __call__(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing,
                 run_expert: RunExpert) -> torch.Tensor:
        if rows.shape[0] == 0:
            return run_slices(rows, token_index, (), run_expert, [0], self.experts)
        # grouped mm finds each expert's rows on the device: no host counts, so no synchronisation, and idle
        # experts get zero gradients through the stacked weights
        grouped = runs_grouped(self.experts, self.layout, rows)
        counts = None if grouped else routing.counts[:routing.num_experts]
        expert_index = routing.expert_index[:rows.shape[0]]
        out = fused_experts_forward(self.experts, self.layout, rows, counts, expert_index)
        if counts is not None and 0 in counts:
            out = zero_grad_path(out, self.experts, [e for e, n in enumerate(counts) if n == 0])
        return out
