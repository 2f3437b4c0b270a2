"""Router noise, applied in training only.

* ``"gumbel"``: add i.i.d. Gumbel(0, 1) noise to the logits. Taking the top-k of the noisy logits
  samples k experts without replacement from ``softmax(logits)`` (the Gumbel-top-k trick).
* ``"gaussian"``: Shazeer et al. (2017), eq. 4: ``H(x) = x W_g + eps * softplus(x W_noise)``, a learned,
  input-dependent standard deviation. ``W_noise`` starts at zero, so the initial std is
  ``softplus(0) + min_std``; ``min_std`` keeps the std, and the smooth load estimator that divides by it,
  away from zero (no NaN).
* ``"jitter"``: Switch Transformer's multiplicative input jitter, ``x * U(1 - eps, 1 + eps)`` before the gate.
* ``"simple"``: no noise on the logits; the selection samples each token's k experts with the SIMPLE sampler
  (:mod:`moefy.routing.simple`) instead of taking the top k.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_int, check_number, check_tensor

NOISE_KINDS = ("gumbel", "gaussian", "jitter", "simple")  # simple: a sampler, see routing/simple.py


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel samples with the shape, dtype and device of ``t``."""
    check_tensor(t, "t", floating=True)
    u = torch.rand_like(t).clamp_(min=torch.finfo(t.dtype).tiny, max=1.0 - torch.finfo(t.dtype).eps)
    return -torch.log(-torch.log(u))


class GaussianNoiseStd(nn.Module):
    """Learned noise standard deviation ``softplus(x W_noise) + min_std`` of Shazeer et al. (2017).

    Args:
        input_dim: D, the router's input features.
        num_columns: number of router columns (experts, plus one for a hole).
        min_std: floor of the standard deviation.
    """

    def __init__(self, input_dim: int, num_columns: int, min_std: float = 1e-2):
        super().__init__()
        check_int(input_dim, "input_dim", min=1)
        check_int(num_columns, "num_columns", min=1)
        check_number(min_std, "min_std", low=0, low_open=True,
                     what="a finite number > 0 (it keeps the std away from 0)")
        self.weight = nn.Parameter(torch.zeros(num_columns, input_dim))
        self.min_std = min_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (T, D), float32 or float64 → std: (T, num_columns), same dtype."""
        return F.softplus(F.linear(x, self.weight.to(x.dtype))) + self.min_std


def validate_noise(noise: Optional[str]) -> Optional[str]:
    """Normalise a noise name; ``None`` and ``"none"`` mean no noise."""
    check_choice(noise, "noise", ("none",) + NOISE_KINDS, optional=True)
    return None if noise == "none" else noise
