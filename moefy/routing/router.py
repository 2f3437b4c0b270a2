"""The router: a linear gate with optional training noise (:mod:`moefy.routing.noise`), run in float32 or wider.

Shapes as in :mod:`moefy.routing.record`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_choice, check_int, check_number
from ..config import SCORE_FUNCS
from .noise import GaussianNoiseStd, gumbel_like, validate_noise


_ROUTER_DTYPES = (torch.float32, torch.float64)


class Router(nn.Module):
    """Linear gate with optional training noise.

    Args:
        input_dim: D.
        num_columns: E' router columns.
        noise: None, ``"gumbel"``, ``"gaussian"`` or ``"jitter"`` (see :mod:`moefy.routing.noise`).
        temperature: logits are divided by it before the score function (seed 001's gate temperature).
        score_func: ``"softmax"`` over columns, or an independent ``"sigmoid"`` per column.
        jitter_eps: half-width of the multiplicative input jitter.
        selection_bias: keep a buffer ``score_correction_bias`` (E',), zeros, that selection adds to the
            scores to choose experts (never to the combine weights): DeepSeek-V3's ``e_score_correction_bias``.
    """

    def __init__(self, input_dim: int, num_columns: int, noise: Optional[str] = None,
                 temperature: float = 1.0, score_func: str = "softmax", jitter_eps: float = 1e-2,
                 selection_bias: bool = False):
        super().__init__()
        self.noise = validate_noise(noise)
        check_choice(score_func, "score_func", SCORE_FUNCS)
        check_int(input_dim, "input_dim", min=1)
        check_int(num_columns, "num_columns", min=1)
        temperature = check_number(temperature, "temperature", low=0, low_open=True, what="a positive finite number")
        check_number(jitter_eps, "jitter_eps", low=0, high=1, high_open=True)
        check_bool(selection_bias, "selection_bias")
        self.gate = nn.Linear(input_dim, num_columns, bias=False)
        self.noise_std = GaussianNoiseStd(input_dim, num_columns) if self.noise == "gaussian" else None
        self.temperature = float(temperature)
        self.score_func = score_func
        self.jitter_eps = jitter_eps
        # (E',) float32, in the state dict; None without selection_bias
        self.register_buffer("score_correction_bias",
                             torch.zeros(num_columns, dtype=torch.float32) if selection_bias else None)

    def forward(self, x: torch.Tensor):
        """``x``: (T, D) → ``(logits, noisy_logits, noise_std, probs)``, each (T, E'), float32 or wider."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.gate.in_features:
            raise ValueError(f"x must have shape (T, input_dim={self.gate.in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        weight = self.gate.weight
        dtype = x.dtype if x.dtype in _ROUTER_DTYPES else router_dtype(x.dtype)
        if weight.dtype != dtype or x.dtype != dtype:
            weight, x = weight.to(dtype), x.to(dtype)
        logits = F.linear(x, weight)
        noisy, std = logits, None
        if self.noise == "gaussian":
            std = self.noise_std(x)
            if self.training:
                noisy = logits + torch.randn_like(logits) * std
        elif self.training and self.noise == "gumbel":
            noisy = logits + gumbel_like(logits)
        elif self.training and self.noise == "jitter":
            jitter = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            noisy = F.linear(x * jitter, weight)
        scaled = noisy / self.temperature if self.temperature != 1.0 else noisy
        probs = scaled.softmax(dim=-1) if self.score_func == "softmax" else scaled.sigmoid()
        return logits, noisy, std, probs


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32, or float64 for float64 inputs: never in half precision."""
    return torch.promote_types(dtype, torch.float32)
