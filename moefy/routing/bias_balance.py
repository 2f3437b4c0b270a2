"""Auxiliary-loss-free load balancing: move each expert's selection bias toward balance.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (as in DeepSeek-V3):
after every optimizer step, with ``c_i`` the tokens expert i received over that step's batch,

    b_i ← b_i + u · sign(mean_j c_j − c_i)

``b`` the selection bias (``router.score_correction_bias``, added to the scores to choose the experts only)
and ``u`` the update rate (``bias_update_rate``). Overloaded experts lose ``u``, underloaded ones gain it, an
expert exactly at the mean keeps its bias. No gradient is involved and no loss interferes with the task's.

Conventions: ``c`` counts the E real experts' picks before any token-choice capacity drop (what the router
asked for: a drop would hide an overload); with a hole, its column is neither counted nor moved (its bias
stays where it is), and the mean is over the E real experts. Masked tokens count nowhere.

The step is additive on the scores the bias is added to: with ``score_func="sigmoid"`` (DeepSeek-V3) every
expert's score lives on the same (0, 1) scale; with a peaked softmax the experts that lose most tokens have
scores near zero, far below one step, and balancing among them needs a smaller ``rate``.

How it runs, without a particular trainer: a block with ``bias_update_rate > 0`` holds a :class:`BiasBalance`
(``block.bias_balance``) whose non-persistent ``counts`` (E,) add up the picks of every *training* forward
(so all micro-batches of a gradient-accumulation step count; eval forwards add nothing and never change the
bias). Call :func:`update_selection_bias` once per optimizer step, after ``optimizer.step()``: it applies the
update to every such block and zeroes the counts. With data or expert parallelism pass the group whose ranks
see different tokens: the counts are all-reduced over it first, so every rank applies the same update. A
forward recomputed by activation checkpointing counts again (as in ``GlobalBalance``); since only the sign of
each expert's distance to the mean is used, recomputing every forward alike changes nothing.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..checks import check_module, check_number, check_tensor
from .record import Routing


def bias_update(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """``bias + rate · sign(mean(counts) − counts)``: the new bias (E,) (a new tensor, in ``bias``'s dtype).

    ``bias`` (E,) floating, ``counts`` (E,) tokens per expert over the step, ``rate`` > 0.
    """
    check_tensor(bias, "bias", floating=True)
    check_tensor(counts, "counts")
    rate = check_number(rate, "rate", low=0, low_open=True)
    if bias.dim() != 1 or tuple(counts.shape) != tuple(bias.shape):
        raise ValueError(f"bias and counts must both have shape (E,), got {tuple(bias.shape)} and "
                         f"{tuple(counts.shape)}")
    load = counts.to(bias.device, torch.float64)                  # (E,)
    error = load.mean() - load                                    # (E,) > 0: underloaded
    return bias + (rate * error.sign()).to(bias.dtype)


class BiasBalance(nn.Module):
    """The counts behind ``bias_update_rate``: picks per real expert since the last update.

    Args:
        num_experts: E (real experts; a hole column is not counted).
        rate: u, the bias moves by ± u per update.
    """

    def __init__(self, num_experts: int, rate: float):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        self.rate = check_number(rate, "rate", low=0, low_open=True)
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)  # (E,)

    def add(self, r: Routing) -> None:
        """Add a training forward's picks (before capacity drops) of the E real experts."""
        if not isinstance(r, Routing):
            raise TypeError(f"BiasBalance.add: r must be a Routing record (block.routing), got {type(r).__name__}")
        if r.num_experts != self.counts.numel():
            raise ValueError(f"BiasBalance counts {self.counts.numel()} experts, the routing r has {r.num_experts}")
        picked = r.picked_count.detach()[: self.counts.numel()]      # (E,)
        self.counts.add_(picked.to(self.counts.device, torch.long))

    @torch.no_grad()
    def step(self, bias: torch.Tensor, group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
        """Update ``bias`` (E',) in place from the counts (all-reduced over ``group``), zero the counts and
        return the counts used (E,)."""
        counts = self.counts.clone()                                  # (E,)
        if group is not None:
            dist.all_reduce(counts, group=group)
        e = counts.numel()
        bias[:e] = bias_update(bias[:e], counts, self.rate)
        self.counts.zero_()
        return counts

    def extra_repr(self) -> str:
        return f"experts={self.counts.numel()}, rate={self.rate}"


def update_selection_bias(model: nn.Module, group: Optional["dist.ProcessGroup"] = None) -> Dict[str, torch.Tensor]:
    """Apply one aux-loss-free bias update to every block of ``model`` with ``bias_update_rate > 0``.

    Call once per optimizer step, after ``optimizer.step()`` (every rank of ``group`` must call it). Each
    block's ``router.score_correction_bias`` moves by ``± bias_update_rate`` toward balance from the picks
    counted since the last call, then the counts restart from zero. Returns ``{module name: counts (E,)}``,
    the tokens per expert each update used (``counts.max() / counts.float().mean()`` is the step's max/mean
    load); empty when no block balances its bias.
    """
    check_module(model, "model")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    used = {}
    for name, module in model.named_modules():
        balance = getattr(module, "bias_balance", None)
        if isinstance(balance, BiasBalance):
            used[name] = balance.step(module.router.score_correction_bias, group)
    return used
