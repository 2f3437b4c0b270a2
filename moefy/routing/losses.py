"""Auxiliary (load-balancing) losses, each a scalar computed from a :class:`~moefy.routing.Routing`.

All columns of the router count, the hole included (E' of them). With ``p̄`` the mean score per column
over tokens, ``f`` the fraction of assignments per column and ``cv²(v) = Var(v) / mean(v)²``
(population variance, as in the original tensor2tensor code of Shazeer et al.):

=========== ============================================================ ===================
name        formula                                                      perfectly balanced
=========== ============================================================ ===================
entropy     ``log E' - H(p̄)``: the seed's entropy criterion, made ≥ 0     0
prob        ``cv²(load)``, Shazeer's smooth load estimator (eq. 8-10)    0
cv2         ``cv²(importance) + cv²(load)``, Shazeer et al. 2017          0
switch      ``E' · Σ_e f_e p̄_e`` (Switch Transformer eq. 4, GShard)       1 (its minimum)
z           ``mean_t logsumexp(logits_t)²`` (ST-MoE router z-loss)        not a balance loss
balance     ``E' · Σ_e (p̄_e - 1/E')²`` = cv²(p̄) (seed 001's regulariser)  0
=========== ============================================================ ===================

``importance_e`` is the sum over tokens of the combine weights given to column e; ``load_e`` is the
expected number of tokens column e receives under the Gaussian noise (needs ``noise="gaussian"`` and token
choice; without it, the hard counts are used and carry no gradient).

With a token-choice capacity (``token_capacity_factor``) every loss sees the router's picks *before* capacity
drops (``indices`` / ``weights`` / :attr:`~moefy.routing.Routing.picked_count`), as Switch's routing fraction
and Megatron-LM's ``tokens_per_expert`` before capacity: dropping does not hide an expert's overload.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict

import torch
from torch.distributions import Normal

from ..checks import check_number, check_tensor
from .record import Routing


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``Var(v) / (mean(v)² + eps)`` with population variance; 0 for fewer than two entries."""
    check_tensor(v, "v")
    check_number(eps, "eps", low=0, finite=False)
    if v.numel() < 2:
        return v.new_zeros(())
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def _takes_routing(loss: Callable[[Routing], torch.Tensor]) -> Callable[[Routing], torch.Tensor]:
    """Reject anything but a Routing record up front, naming the argument."""
    @functools.wraps(loss)
    def checked(r: Routing) -> torch.Tensor:
        if not isinstance(r, Routing):
            raise TypeError(f"{loss.__name__}: r must be a Routing record (block.routing), got {type(r).__name__}")
        return loss(r)
    return checked


def _mean_probs(r: Routing) -> torch.Tensor:
    if r.num_tokens == 0:
        return r.probs.new_full((r.probs.shape[1],), 1.0 / r.probs.shape[1])
    p = r.probs.mean(dim=0)
    return p / p.sum()


@_takes_routing
def importance(r: Routing) -> torch.Tensor:
    """(E',): sum over tokens of the combine weight each column received (token choice: before capacity
    drops)."""
    if r.mode == "token_choice":
        columns, weight = r.indices.reshape(-1), r.weights.reshape(-1)    # (T*k,) each
    else:
        columns, weight = r.expert_index, r.weight                         # (A,) each
    return weight.new_zeros(r.probs.shape[1]).index_add(0, columns, weight)


@_takes_routing
def smooth_load(r: Routing) -> torch.Tensor:
    """(E',): Shazeer's differentiable load, ``Σ_t P(column e stays in token t's top-k | new noise)``.

    Thresholds and scores are both noisy/clean *logits*, so they live in the same space. Falls back to the
    hard counts (no gradient) when there is no learned noise or the routing is not token choice.
    """
    num_columns = r.probs.shape[1]
    k = r.indices.shape[1] if r.mode == "token_choice" else 0
    if r.noise_std is None or r.mode != "token_choice" or k >= num_columns or r.num_tokens == 0:
        return r.picked_count.to(r.probs.dtype)
    top = r.noisy_logits.topk(k + 1, dim=-1).values
    threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = r.noisy_logits > threshold_if_in
    normal = Normal(r.logits.new_zeros(()), r.logits.new_ones(()))
    prob_if_in = normal.cdf((r.logits - threshold_if_in) / r.noise_std)
    prob_if_out = normal.cdf((r.logits - threshold_if_out) / r.noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)


@_takes_routing
def entropy_loss(r: Routing) -> torch.Tensor:
    p = _mean_probs(r)
    return math.log(p.numel()) + (p * p.clamp_min(1e-12).log()).sum()


@_takes_routing
def prob_loss(r: Routing) -> torch.Tensor:
    return cv_squared(smooth_load(r))


@_takes_routing
def cv2_loss(r: Routing) -> torch.Tensor:
    return cv_squared(importance(r)) + cv_squared(smooth_load(r))


@_takes_routing
def switch_loss(r: Routing) -> torch.Tensor:
    counts = r.picked_count.to(r.probs.dtype)                              # (E',) before capacity drops
    frac = counts / counts.sum().clamp_min(1)
    return counts.numel() * (frac * _mean_probs(r)).sum()


@_takes_routing
def z_loss(r: Routing) -> torch.Tensor:
    if r.num_tokens == 0:
        return r.logits.new_zeros(())
    return (torch.logsumexp(r.logits, dim=-1) ** 2).mean()


@_takes_routing
def balance_loss(r: Routing) -> torch.Tensor:
    p = _mean_probs(r)
    return p.numel() * ((p - 1.0 / p.numel()) ** 2).sum()


AUX_LOSSES: Dict[str, Callable[[Routing], torch.Tensor]] = {
    "entropy": entropy_loss,
    "prob": prob_loss,
    "cv2": cv2_loss,
    "switch": switch_loss,
    "z": z_loss,
    "balance": balance_loss,
}
