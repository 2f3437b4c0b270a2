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
seq_balance mean over sequences of ``Σ_i f_i P_i`` (DeepSeek-V3 eq. 17-20)    1
global_sw.  ``switch`` with ``f`` counted over all micro-batches and ranks    1
=========== ============================================================ ===================

``seq_balance`` (DeepSeek-V3's complementary sequence-wise loss): per sequence of L routed tokens,
``f_i = E' / (k L) · Σ_t 1[i ∈ topk(t)]`` and ``P_i = 1/L Σ_t s'_{i,t}``, ``s'`` the scores normalised to
sum to one over the E' columns of each token; sequences are the leading dim of ``tokens_shape`` (B, L, ...),
flat tokens (T,) are one sequence, masked tokens count nowhere, sequences with no routed token are skipped.
DeepSeek-V3 counts the N_r routed experts; here the hole is a column like any other (E' = E + 1 with a hole),
so its slots count in ``f`` and its score in ``P``, as in every loss here. Token choice only.

``global_switch`` (global-batch balancing, Qiu et al. 2025 "Demons in the detail"): the Switch loss with
``f`` the fraction of the assignments of every micro-batch since the last :meth:`GlobalBalance.reset`
(and, with ``GlobalBalance.group``, of every rank of that group), and ``p̄`` this micro-batch's. The counts
live in a :class:`GlobalBalance` on the block (``block.global_balance``); see there.

``importance_e`` is the sum over tokens of the combine weights given to column e; ``load_e`` is the
expected number of tokens column e receives under the Gaussian noise (needs ``noise="gaussian"`` and token
choice; without it, the hard counts are used and carry no gradient).

With a token-choice capacity (``token_capacity_factor``) every loss sees the router's picks *before* capacity
drops (``indices`` / ``weights`` / :attr:`~moefy.routing.Routing.picked_count`), as Switch's routing fraction
and Megatron-LM's ``tokens_per_expert`` before capacity: dropping does not hide an expert's overload.

Non-finite tokens (``Routing.finite`` False: routed nowhere, see :mod:`moefy.routing.select`) count in no
loss: every mean is over the finite tokens, every count is of their picks, so a NaN token changes no loss
(each equals the loss of the batch with that token masked out, to float rounding). Without a finite token a
loss is that of an empty batch.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributions import Normal

from ..checks import check_int, check_number, check_tensor
from ..config import AUX_LOSS_NAMES
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
    def checked(r: Routing, *args, **kwargs) -> torch.Tensor:
        if not isinstance(r, Routing):
            raise TypeError(f"{loss.__name__}: r must be a Routing record (block.routing), got {type(r).__name__}")
        return loss(r, *args, **kwargs)
    return checked


def _finite_mean(r: Routing, values: torch.Tensor) -> torch.Tensor:
    """The mean over the finite tokens of ``values`` (T, ...) (the rows of non-finite ones may be NaN):
    ``values.mean(0)`` bit for bit when every token is finite; zeros without a finite token."""
    if r.finite is None:
        return values.mean(dim=0)
    finite = r.finite.view(-1, *(1,) * (values.dim() - 1))
    mean = torch.where(finite, values, values.new_zeros(())).mean(dim=0)   # zero rows: no gradient to NaN ones
    return mean * (r.num_tokens / r.finite.sum().clamp_min(1))


def _finite_rows(r: Routing, values: torch.Tensor) -> torch.Tensor:
    """``values`` (T, ...) with the rows of non-finite tokens zero (and no gradient)."""
    if r.finite is None:
        return values
    return torch.where(r.finite.view(-1, *(1,) * (values.dim() - 1)), values, values.new_zeros(()))


def _mean_probs(r: Routing) -> torch.Tensor:
    uniform = r.probs.new_full((r.probs.shape[1],), 1.0 / r.probs.shape[1])
    if r.num_tokens == 0:
        return uniform
    p = _finite_mean(r, r.probs)                                              # (E',)
    total = p.sum()
    if r.finite is None:
        return p / total
    return torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), uniform)  # no finite token


@_takes_routing
def importance(r: Routing) -> torch.Tensor:
    """(E',): sum over tokens of the combine weight each column received (token choice: before capacity
    drops)."""
    if r.mode == "token_choice":
        columns, weight = r.indices.reshape(-1), _finite_rows(r, r.weights).reshape(-1)  # (T*k,) each
    else:  # non-finite tokens' picks (NaN weights) may still be listed on an accelerator
        columns, weight = r.expert_index, r.weight                                      # (A,) each
        weight = torch.where(weight.isfinite(), weight, weight.new_zeros(()))
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
    z_in = _finite_rows(r, (r.logits - threshold_if_in) / r.noise_std)      # the cdf refuses a NaN argument
    z_out = _finite_rows(r, (r.logits - threshold_if_out) / r.noise_std)
    return _finite_rows(r, torch.where(is_in, normal.cdf(z_in), normal.cdf(z_out))).sum(dim=0)


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
    return global_switch_loss(r)  # f from this record's own picks


@_takes_routing
def z_loss(r: Routing) -> torch.Tensor:
    if r.num_tokens == 0:
        return r.logits.new_zeros(())
    return _finite_mean(r, torch.logsumexp(r.logits, dim=-1) ** 2)


@_takes_routing
def balance_loss(r: Routing) -> torch.Tensor:
    p = _mean_probs(r)
    return p.numel() * ((p - 1.0 / p.numel()) ** 2).sum()


def _sequences(r: Routing):
    """(T,) sequence id of each routed row and the number of sequences S: the leading dim of
    ``tokens_shape`` (B, L, ...); flat tokens (T,) are one sequence."""
    shape = r.tokens_shape
    per_seq = math.prod(shape[1:]) if len(shape) > 1 else max(r.num_inputs, 1)
    ids = r.kept if r.kept is not None else torch.arange(r.num_tokens, device=r.probs.device)  # (T,)
    return torch.div(ids, per_seq, rounding_mode="floor"), (shape[0] if len(shape) > 1 else 1)


@_takes_routing
def seq_balance_loss(r: Routing) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``Σ_i f_i P_i`` per sequence, averaged over sequences."""
    if r.mode != "token_choice":
        raise ValueError(f"seq_balance needs a token_choice routing, got {r.mode!r}")
    num_tokens, num_columns = r.probs.shape
    if num_tokens == 0:
        return r.probs.new_zeros(())
    k = r.indices.shape[1]
    seq, num_seqs = _sequences(r)                                                 # (T,)
    scores = _finite_rows(r, r.probs / r.probs.sum(dim=-1, keepdim=True).clamp_min(1e-20))  # (T, E') s'
    one = r.probs.new_ones(num_tokens) if r.finite is None else r.finite.to(r.probs.dtype)  # (T,) counted tokens
    length = r.probs.new_zeros(num_seqs).index_add(0, seq, one)                   # (S,) L per sequence
    p = r.probs.new_zeros(num_seqs, num_columns).index_add(0, seq, scores)        # (S, E') Σ_t s'
    hits = r.probs.new_zeros(num_seqs, num_columns).index_put_(                   # (S, E') Σ_t 1[i ∈ topk(t)]
        (seq.repeat_interleave(k), r.indices.reshape(-1)), one.repeat_interleave(k), accumulate=True)
    length = length.clamp_min(1)[:, None]                                         # (S, 1)
    per_seq = (num_columns / (k * length) * hits * (p / length)).sum(dim=-1)      # (S,), 0 without tokens
    present = (hits.sum(dim=-1) > 0).sum()                                        # sequences with tokens
    return per_seq.sum() / present.clamp_min(1)


@_takes_routing
def global_switch_loss(r: Routing, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``E' · Σ_e f_e p̄_e`` with ``f`` from ``counts`` (E',) (assignments per column over the global
    batch; default this record's own picks before capacity drops, which is the Switch loss) and ``p̄`` from
    this record."""
    counts = r.picked_count if counts is None else counts
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (r.probs.shape[1],):
        raise ValueError(f"counts must be a tensor of shape (E'={r.probs.shape[1]},), got "
                         f"{tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    counts = counts.to(r.probs.device, r.probs.dtype)
    frac = counts / counts.sum().clamp_min(1)
    return counts.numel() * (frac * _mean_probs(r)).sum()


class GlobalBalance(nn.Module):
    """The counts behind ``aux_criterion="global_switch"``: assignments per router column, summed over the
    micro-batches of one optimizer step (and over the ranks of ``group``).

    A block configured with ``global_switch`` holds one as ``block.global_balance``. Every training forward
    adds its counts (all-reduced over ``group`` first when one is set) and returns
    :func:`global_switch_loss` with the counts so far: ``f`` is exact for the last micro-batch of the step
    and a running estimate before it (a later micro-batch's counts are unknown when an earlier one's loss is
    backpropagated), ``p̄`` is always the micro-batch's own, so gradients stay per micro-batch. Call
    :meth:`reset` (or :func:`reset_global_balance` on the model) after every optimizer step. Eval forwards
    use the counts so far plus their own and store nothing. A recomputed forward (activation checkpointing)
    counts again; that doubles every count alike when all forwards are recomputed.

    Ranks: under expert parallelism with ``aux_scope="global"`` the record is already the whole group's, so
    leave ``group`` None; with data parallelism (replicated experts, or ``aux_scope="local"``) set
    ``block.global_balance.group`` to the data-parallel group so ``f`` counts every rank's tokens (one
    all-reduce of E' ints per forward; every rank must forward).

    Args:
        num_columns: E'.
        group: the process group to all-reduce the counts over, or None.
    """

    def __init__(self, num_columns: int, group: Optional["dist.ProcessGroup"] = None):
        super().__init__()
        check_int(num_columns, "num_columns", min=1, what="an int >= 1")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        self.group = group
        self.register_buffer("counts", torch.zeros(num_columns, dtype=torch.long), persistent=False)  # (E',)

    def forward(self, r: Routing) -> torch.Tensor:
        """Add the record's counts (training only) and return the global-batch Switch loss."""
        if not isinstance(r, Routing):
            raise TypeError(f"GlobalBalance: r must be a Routing record (block.routing), got {type(r).__name__}")
        if r.count.shape != self.counts.shape:
            raise ValueError(f"GlobalBalance holds counts for {self.counts.numel()} columns, the routing r has "
                             f"{r.count.numel()}")
        count = r.picked_count.detach().to(self.counts.device, torch.long, copy=True)  # (E',) before drops
        if self.group is not None:
            dist.all_reduce(count, group=self.group)
        total = self.counts + count                                               # (E',)
        if self.training:
            self.counts.copy_(total)
        return global_switch_loss(r, total)

    def reset(self) -> None:
        """Start a new global batch: zero the counts."""
        self.counts.zero_()

    def extra_repr(self) -> str:
        return f"columns={self.counts.numel()}"


def reset_global_balance(model: nn.Module) -> int:
    """Zero the counts of every :class:`GlobalBalance` in ``model``; returns how many were reset."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, GlobalBalance)]
    for m in found:
        m.reset()
    return len(found)


AUX_LOSSES: Dict[str, Callable[[Routing], torch.Tensor]] = {
    "entropy": entropy_loss,
    "prob": prob_loss,
    "cv2": cv2_loss,
    "switch": switch_loss,
    "z": z_loss,
    "balance": balance_loss,
    "seq_balance": seq_balance_loss,
    "global_switch": global_switch_loss,
}
if tuple(AUX_LOSSES) != AUX_LOSS_NAMES:  # the config checks aux_criterion against AUX_LOSS_NAMES
    raise ImportError(f"moefy.routing.losses: AUX_LOSSES {list(AUX_LOSSES)} must match moefy.config.AUX_LOSS_NAMES "
                      f"{list(AUX_LOSS_NAMES)}")
