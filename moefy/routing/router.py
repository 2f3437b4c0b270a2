"""The router: a linear gate with optional training noise (:mod:`moefy.routing.noise`), run in float32 or wider
(also under autocast, also with a PEFT adapter on the gate).

Shapes as in :mod:`moefy.routing.record`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_choice, check_int, check_number
from ..config import SCORE_FUNCS
from ..wrappers import autocast_on, plain_linear
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
        """``x``: (T, D) → ``(logits, noisy_logits, noise_std, probs)``, each (T, E'), float32 or wider.

        The router math runs in float32 (float64 for float64 inputs) whatever the input's dtype, also under
        ``torch.autocast`` (any device type: autocast is off inside), so autocast never changes which experts
        a token goes to.

        A plain ``nn.Linear`` gate is read directly: its weight (bf16 in a bf16 model) cast to float32. A gate
        that something wraps (a PEFT LoRA layer, a parametrization, hooks, another module) is called as a module,
        so the wrapper runs and trains: when its floating parameters are already in the router dtype it gets the
        input in that dtype; otherwise it runs on copies of them in the router dtype
        (``torch.func.functional_call``; the gradients reach the original parameters), so an adapted router in
        a bf16 model routes in float32 too, as the same router does after ``merge_and_unload``.
        """
        in_features = getattr(self.gate, "in_features", None)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or in_features is not None and x.shape[1] != in_features:
            raise ValueError(f"x must have shape (T, input_dim={in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if autocast_on(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._scores(x)
        return self._scores(x)

    def _scores(self, x: torch.Tensor):
        dtype = x.dtype if x.dtype in _ROUTER_DTYPES else router_dtype(x.dtype)
        x = x if x.dtype == dtype else x.to(dtype)
        gate = self._gate_in(dtype)
        logits = gate(x)
        noisy, std = logits, None
        if self.noise == "gaussian":
            std = self.noise_std(x)
            if self.training:
                noisy = logits + torch.randn_like(logits) * std
        elif self.training and self.noise == "gumbel":
            noisy = logits + gumbel_like(logits)
        elif self.training and self.noise == "jitter":
            jitter = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            noisy = gate(x * jitter)
        scaled = noisy / self.temperature if self.temperature != 1.0 else noisy
        probs = scaled.softmax(dim=-1) if self.score_func == "softmax" else scaled.sigmoid()
        return logits, noisy, std, probs

    def _gate_in(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """The gate as a function (T, D) in ``dtype`` → (T, E') in ``dtype``, its math in ``dtype``."""
        gate = self.gate
        if plain_linear(gate):  # the fast path: no module call
            weight, bias = gate.weight, gate.bias
            weight = weight if weight.dtype == dtype else weight.to(dtype)
            bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
            return lambda x: F.linear(x, weight, bias)
        lower = {name: p.to(dtype) for name, p in gate.named_parameters()
                 if p.is_floating_point() and p.dtype != dtype}
        if not lower:
            return lambda x: gate(x).to(dtype)
        return lambda x: torch.func.functional_call(gate, lower, (x,)).to(dtype)


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32, or float64 for float64 inputs: never in half precision."""
    return torch.promote_types(dtype, torch.float32)
