"""Performance tricks, all in one place: each replaces a plain torch call that computes the same values.

The reason for each is one line here; the measurements behind them are in ``benchmarks/FASTPATHS.md``.
Everything else in moefy calls these instead of deciding about speed itself.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# A shared 0-dim zero: "no tokens dropped" without allocating a tensor in every forward (µs at batch size 1).
NO_DROPS = torch.zeros((), dtype=torch.long)
# Up to this many output elements the combine accumulates with index_put_ (a third of index_add_'s cost for a
# few rows on CPU); beyond it index_put_'s sort-based kernel is the slower one.
SMALL_COMBINE = 16384
# On CPU, F.linear on 2-16 rows of a large weight repacks the whole weight per call; W @ x.T reads it in place.
FEW_ROWS, BIG_WEIGHT = 16, 1 << 18


def top_k(probs: torch.Tensor, k: int):
    """``probs.topk(k, dim=-1)`` for (T, E') scores ≥ 0: (values, indices), best first.

    On CPU, ``topk`` over many short rows is much slower than a ``max`` over them, so for small k this takes
    k maxima instead, masking each winner before the next. On CUDA ``topk`` is one kernel.
    """
    if k == 1:
        return probs.max(dim=-1, keepdim=True)
    if k > 4 or probs.numel() < 4096 or probs.is_cuda:
        return probs.topk(k, dim=-1)
    masked, picks = probs.detach(), []
    for j in range(k):
        picks.append(masked.max(dim=-1, keepdim=True).indices)
        if j + 1 < k:  # scores are >= 0: a masked winner is never picked again
            masked = masked.scatter(-1, picks[-1], -1.0)
    idx = torch.cat(picks, dim=-1)
    return probs.gather(-1, idx), idx


def count_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) long: how often each id in [0, size) occurs in ``ids``, on its device.

    ``bincount`` on CUDA reads the maximum back to the host first (a synchronisation); ``index_add_`` does not.
    """
    if ids.is_cuda:
        return ids.new_zeros(size).index_add_(0, ids, torch.ones_like(ids))
    return torch.bincount(ids, minlength=size)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, where the host can tell for free: on CPU one sum read back
    (no device to wait for; a sum that overflows reads as not finite). Always False on an accelerator, where
    the read would synchronise, and under ``torch.compile``, where it would break the graph: callers then take
    their per-row path, which is right for any input."""
    if not x.is_cpu or compiling():
        return False
    return math.isfinite((x.detach() if x.requires_grad else x).sum().item())


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing this call."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling is not None and is_compiling())


def add_rows(y: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``y.index_add_(0, index, rows)``; with index_put_ for a few rows on CPU (see :data:`SMALL_COMBINE`)."""
    if rows.numel() <= SMALL_COMBINE and not rows.is_cuda:
        return y.index_put_((index,), rows, accumulate=True)
    return y.index_add_(0, index, rows)


def set_plain_attribute(module: nn.Module, name: str, value) -> None:
    """``module.name = value`` for a non-tensor, non-module value, skipping nn.Module.__setattr__'s checks
    (µs per forward)."""
    module.__dict__[name] = value


def transposed_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``W @ x.T`` beats ``x @ W.T`` for rows ``x`` (n, in): 2-16 rows of a large weight on CPU."""
    return 2 <= x.shape[0] <= FEW_ROWS and not x.is_cuda and weight.numel() >= BIG_WEIGHT


def few_rows_each(num_rows: int, num_experts: int) -> bool:
    """Whether ``num_rows`` rows over ``num_experts`` experts are few enough per expert (on average at most
    :data:`FEW_ROWS`) that each expert's matmuls read its weights rather than compute (decoding)."""
    return num_rows <= FEW_ROWS * num_experts


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (n, in) → (n, out), computed transposed where that pays."""
    if transposed_pays(x, weight):
        y = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x.t())
        return y.t()
    return F.linear(x, weight, bias)
