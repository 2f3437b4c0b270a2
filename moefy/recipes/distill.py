"""Mutual distillation among experts: MoDE (Xie et al. 2024, arXiv 2402.00893; seed 003).

Every expert i is pulled towards every other expert j's temperature-softened prediction::

    L_KD = T² / (E (E − 1)) · Σ_{i ≠ j} ḡ_i · KL( softmax(z_j / T) ‖ softmax(z_i / T) )

with ``z_e`` expert e's logits, the KL averaged over the batch, ``ḡ_i`` the batch mean of expert i's gate and
the teacher ``softmax(z_j / T)`` detached (it is a target). The training objective mixes it with the task
loss: ``(1 − α) · L_task + α · L_KD`` (:func:`mode_loss`).

Distillation needs every expert's prediction on every sample, not only on the ones routed to it: that dense
pass is :func:`expert_logits`. Two ways in:

* ``mutual_distillation_loss(expert_logits, gates)`` on tensors you computed, (E, ..., C) and (..., E);
* ``block_distillation_loss(block, x)`` for any :class:`~moefy.block.MoEBlock` whose experts output logits,
  right after ``block(x)``: gates are the block's router scores of that forward.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..block import MoEBlock
from ..checks import check_number, check_tensor


def mutual_distillation_loss(expert_logits: torch.Tensor, gates: torch.Tensor,
                             temperature: float = 2.0) -> torch.Tensor:
    """The MoDE distillation term ``L_KD`` (see the module docstring).

    Args:
        expert_logits: (E, ..., C) every expert's logits on the same N = prod(...) samples.
        gates: (..., E) gate values (router scores) of those samples; only their batch mean per expert is used.
        temperature: T > 0 of the softened outputs; the loss is scaled by T².
    Returns:
        scalar; 0 for a single expert.
    """
    if not isinstance(expert_logits, torch.Tensor) or expert_logits.dim() < 3:
        raise ValueError(f"expert_logits must be a tensor of shape (E, ..., C), got "
                         f"{getattr(expert_logits, 'shape', type(expert_logits).__name__)}")
    if not expert_logits.is_floating_point():
        raise TypeError(f"expert_logits must be a floating-point tensor, got dtype {expert_logits.dtype}")
    num_experts = expert_logits.shape[0]
    if not isinstance(gates, torch.Tensor) or gates.shape != (*expert_logits.shape[1:-1], num_experts):
        raise ValueError(f"gates must have shape (..., E) = {(*expert_logits.shape[1:-1], num_experts)}, got "
                         f"{getattr(gates, 'shape', type(gates).__name__)}")
    _check_temperature(temperature)
    if num_experts < 2:
        return expert_logits.new_zeros(())
    z = rearrange(expert_logits, "e ... c -> e (...) c") / temperature
    n = z.shape[1]
    log_p = z.log_softmax(dim=-1)                     # students, with gradient
    teacher = log_p.detach().exp()                    # targets, no gradient
    teacher_neg_entropy = torch.xlogy(teacher, teacher).sum(dim=(1, 2)) / n      # (E,)
    cross = torch.einsum("jnc,inc->ij", teacher, log_p) / n                        # (student i, teacher j)
    kl = teacher_neg_entropy.unsqueeze(0) - cross                                  # KL(p_j ‖ p_i), mean over n
    kl = kl * (1 - torch.eye(num_experts, dtype=kl.dtype, device=kl.device))        # i ≠ j
    mean_gate = rearrange(gates, "... e -> (...) e").to(kl.dtype).mean(dim=0)      # (E,)
    return (mean_gate.unsqueeze(1) * kl).sum() * temperature ** 2 / (num_experts * (num_experts - 1))


def _check_temperature(temperature) -> None:
    check_number(temperature, "temperature", low=0, low_open=True, what="a finite positive number")


def mode_loss(task_loss: torch.Tensor, distill_loss: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``(1 − alpha) · task_loss + alpha · distill_loss``, alpha in [0, 1] (seed 003's mix)."""
    check_number(alpha, "alpha", low=0, high=1)
    for name, value in (("task_loss", task_loss), ("distill_loss", distill_loss)):
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
            raise TypeError(f"{name} must be a scalar tensor or a number, got {type(value).__name__}")
    return (1 - alpha) * task_loss + alpha * distill_loss


def expert_logits(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Run every real expert of ``block`` on every token of ``x`` (..., D): → (E, ..., C).

    A dense pass (E times the sparse compute), for distillation. Token routing only.
    """
    if not isinstance(block, MoEBlock):
        raise TypeError(f"block must be a MoEBlock, got {type(block).__name__}")
    if block.route != "tokens":
        raise ValueError("expert_logits needs route='tokens'; per-sample routing is not supported")
    check_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] != block.input_dim:
        raise ValueError(f"x must have shape (..., input_dim={block.input_dim}), got {tuple(x.shape)}")
    rows = x.reshape(-1, block.input_dim)
    outs = torch.stack([block.expert_forward(expert, rows) for expert in block.experts])
    return outs.reshape(block.num_experts, *x.shape[:-1], *outs.shape[2:])


def block_distillation_loss(block: MoEBlock, x: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """:func:`mutual_distillation_loss` of ``block``'s experts on ``x`` (..., D), call it right after ``block(x)``.

    Gates are the router scores of that forward (``block.routing.probs``, the real experts' columns; with
    training noise they are the noisy scores the block routed with).
    """
    if not isinstance(block, MoEBlock):
        raise TypeError(f"block must be a MoEBlock, got {type(block).__name__}")
    check_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] != block.input_dim:
        raise ValueError(f"x must have shape (..., input_dim={block.input_dim}), got {tuple(x.shape)}")
    _check_temperature(temperature)
    routing = block._last()
    rows = x.reshape(-1, block.input_dim)
    if routing.num_tokens != rows.shape[0]:
        raise ValueError(f"block.routing is for {routing.num_tokens} tokens but x has {rows.shape[0]}: "
                         f"call block(x) first")
    logits = expert_logits(block, rows)
    return mutual_distillation_loss(logits, routing.probs[:, :block.num_experts], temperature)
