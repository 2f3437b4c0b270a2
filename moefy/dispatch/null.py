"""MoE++'s zero-computation ("null") experts (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods
with Zero-Computation Experts"): router columns E, E+1, ... after the real experts, kinds in the order copy,
constant, zero (``RoutingConfig.null_columns``), then the hole.

- zero: contributes nothing; its slots are in the dropped tail of the record (like the hole's) and never run.
- copy: ``w · x``.
- constant: ``w · (α1·x + α2·v_j)`` with ``(α1, α2) = softmax(W_j·x)``, MoE++'s ``ConstantExpert``: v_j (D,)
  and W_j (2, D) learned, in :class:`ConstantExperts`.

The record groups assignments by column, so the copy and constant slots are one contiguous slice right after
the real experts' ones: :func:`add_null` adds their contributions to the combined output, after the real
experts' combine (``aggregation="mean"`` averages the real experts' outputs only).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..routing.record import Routing
from .experts import zero_grad_path


class ConstantExperts(nn.Module):
    """n constant experts over D features: ``constant`` (n, D), MoE++'s ``v`` (init N(0, 1)), and ``gate``
    (n, 2, D), each expert's bias-free ``W_c`` of ``softmax(W_c·x)`` (init as ``nn.Linear(D, 2)``)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(num, dim))
        bound = 1 / math.sqrt(dim)
        self.gate = nn.Parameter(torch.empty(num, 2, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``x`` (n, D) rows, ``j`` (n,) the constant expert of each → (n, D) ``α1·x + α2·v_j``."""
        num, _, dim = self.gate.shape
        logits = x.to(self.gate.dtype) @ self.gate.reshape(num * 2, dim).t()             # (n, 2·num)
        pair = logits.view(-1, num, 2).gather(1, j.view(-1, 1, 1).expand(-1, 1, 2))      # (n, 1, 2)
        alpha = pair.squeeze(1).softmax(-1).to(x.dtype)                                  # (n, 2)
        return alpha[:, :1] * x + alpha[:, 1:] * self.constant.index_select(0, j).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num={self.constant.shape[0]}, dim={self.constant.shape[1]}"


def add_null(y: torch.Tensor, rows: torch.Tensor, routing: Routing,
             constants: Optional[ConstantExperts] = None) -> torch.Tensor:
    """``y`` plus the weighted outputs of the copy and constant slots of ``routing``.

    Args:
        y: (T, *F_out) the combined real experts' output.
        rows: (T, *F) the rows the record routed (its token ids index them).
        routing: the record; its ``null_columns`` name the null columns.
        constants: the block's constant experts (needed when ``null_columns`` has ``"constant"``).
    Returns:
        (T, *F_out). Unused constant experts get zero gradients (not None).
    """
    if y.shape[1:] != rows.shape[1:]:
        raise ValueError(f"null_experts 'copy' / 'constant' return (a mix of) their input: they need expert "
                         f"outputs of the input's shape {tuple(rows.shape[1:])}, the experts returned "
                         f"{tuple(y.shape[1:])}")
    e, kinds = routing.num_experts, routing.null_columns
    copies = kinds.count("copy")
    counts = routing.counts
    start = sum(counts[:e])                                                   # first null slot
    n_copy = sum(counts[e:e + copies])
    n_const = sum(counts[e + copies:e + routing.num_computed_null])
    tok = routing.token_index[start:start + n_copy + n_const]                 # (B,)
    w = routing.weight[start:start + n_copy + n_const].to(y.dtype)            # (B,)
    x = rows.index_select(0, tok)                                             # (B, *F)
    if constants is not None:
        j = routing.expert_index[start + n_copy:start + n_copy + n_const] - (e + copies)  # (B_const,)
        x = torch.cat([x[:n_copy], constants(x[n_copy:], j)]) if n_const else zero_grad_path(x, [constants], [0])
    return y.index_add(0, tok, x * w.reshape((-1,) + (1,) * (x.dim() - 1)))
