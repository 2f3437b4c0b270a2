"""Shared experts (DeepSeek-V3, Qwen2-MoE): always-on experts whose output is added to the routed mixture.

Every routed row goes through every shared expert: per token with ``route="tokens"``, the whole sample with
``route="samples"``. Masked rows (padding) are not routed, so they skip the shared experts too and keep their
zero output. Shared experts are not router columns: they appear in no load, count, dropped total or aux loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

RunShared = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def add_shared(y: torch.Tensor, rows: torch.Tensor, router_in: torch.Tensor, kept: Optional[torch.Tensor],
               num_shared: int, run_shared: RunShared, gate: Optional[nn.Linear] = None) -> torch.Tensor:
    """``y + [sigmoid(router_in · w_g)] · Σ_j shared_j(rows)`` on the routed rows.

    Args:
        y: (T, *F_out) the routed mixture.
        rows: (T, *F) what the experts get.
        router_in: (T_kept, D) what the router read (the rows' features; the gate reads them too).
        kept: (T_kept,) ids of the routed rows among the T, or None when every row was routed.
        num_shared: S ≥ 1 shared experts.
        run_shared: ``run_shared(j, x, row_ids)`` runs shared expert j on rows ``x`` (n, *F) → (n, *F_out).
        gate: Qwen2-MoE's ``shared_expert_gate``, a bias-free ``nn.Linear(D, 1)``, or None (no gate).
    Returns:
        (T, *F_out).
    """
    ids = kept if kept is not None else torch.arange(rows.shape[0], device=rows.device)  # (T_kept,)
    x = rows if kept is None else rows.index_select(0, kept)                               # (T_kept, *F)
    shared = run_shared(0, x, ids)                                                         # (T_kept, *F_out)
    for j in range(1, num_shared):
        shared = shared + run_shared(j, x, ids)
    if gate is not None:  # one sigmoid per row, in the experts' dtype (as Qwen2-MoE)
        g = torch.sigmoid(gate(router_in.to(gate.weight.dtype))).to(shared.dtype)         # (T_kept, 1)
        shared = shared * g.reshape((-1,) + (1,) * (shared.dim() - 1))
    if kept is None:
        return y + shared.to(y.dtype)
    return y.index_add(0, kept, shared.to(y.dtype))  # masked rows stay zero
