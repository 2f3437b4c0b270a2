"""The sparsely-gated mixture-of-experts layer of Shazeer et al. (2017), with seed 000's interface.

``MoE(input_size, output_size, num_experts, hidden_size, k=4, noisy_gating=True)`` and
``y, aux_loss = moe(x)``, as in the seed (a port of davidmrau/mixture-of-experts), built on
:class:`~moefy.block.MoEBlock`:

* gate: ``H(x) = x W_g + ε · (softplus(x W_noise) + 0.01)`` in training (``noise="gaussian"``), clean logits
  in eval; top-k; softmax over the k chosen logits (= the full softmax renormalised over the top k).
* aux loss: ``loss_coef · (cv²(importance) + cv²(load))`` with the smooth load estimator, thresholds and
  scores both in logit space; finite in eval too (the noise std never falls below 0.01).
* experts: MLPs ``Linear → ReLU → Linear`` that return logits. The seed ended every expert with a softmax and
  then put the mixture under ``CrossEntropyLoss``, which applies log-softmax again to probabilities; here the
  experts' logits are mixed, so the output is logits for a cross-entropy loss.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_bool, check_int, check_number


class MLPExpert(nn.Sequential):
    """``Linear(input_size, hidden_size) → ReLU → Linear(hidden_size, output_size)``, no output activation."""

    def __init__(self, input_size: int, output_size: int, hidden_size: int):
        super().__init__(nn.Linear(input_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, output_size))


class MoE(MoEBlock):
    """Sparsely-gated mixture of MLP experts; ``forward`` returns ``(y, aux_loss)``.

    Args:
        input_size: D, features of ``x`` (..., D).
        output_size: features of ``y`` (..., output_size).
        num_experts: E.
        hidden_size: hidden width of every expert MLP.
        k: experts per token.
        noisy_gating: learned Gaussian gate noise in training (Shazeer et al. 2017, eq. 4).
        loss_coef: weight of ``cv²(importance) + cv²(load)`` in the returned ``aux_loss``.
        **routing: ``config`` (a :class:`~moefy.config.RoutingConfig`) and any of its fields (``hole``,
            ``aggregation``, ``layer_id`` …); ``k``, the gate noise and the aux loss come from the arguments
            above unless given here.
    """

    def __init__(self, input_size: int, output_size: int, num_experts: int, hidden_size: int, k: int = 4,
                 noisy_gating: bool = True, loss_coef: float = 1e-2, **routing):
        for name, value in (("input_size", input_size), ("output_size", output_size),
                            ("num_experts", num_experts), ("hidden_size", hidden_size)):
            check_int(value, name, min=1)
        check_number(loss_coef, "loss_coef", low=0)
        check_bool(noisy_gating, "noisy_gating")
        routing.setdefault("noise", "gaussian" if noisy_gating else None)
        routing.setdefault("aux_criterion", {"cv2": float(loss_coef)})
        experts = [MLPExpert(input_size, output_size, hidden_size) for _ in range(num_experts)]
        super().__init__(experts=experts, input_dim=input_size, k=k, **routing)
        self.output_size, self.hidden_size, self.loss_coef = output_size, hidden_size, float(loss_coef)
        self.noisy_gating = self.noise == "gaussian"

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x`` (n_e, input_size) → logits (n_e, output_size)."""
        return expert(x)

    def forward(self, x: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """``x`` (..., input_size) → ``(y (..., output_size), aux_loss ())``; ``aux_loss`` already carries
        ``loss_coef``: add it to the task loss as it is. ``kwargs``: ``token_mask`` (see :class:`MoEBlock`)."""
        y = super().forward(x, **kwargs)
        return y, self.aux_loss
