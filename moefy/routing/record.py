"""The router and the record of what it decided.

Shapes: T tokens (or samples, with per-sample routing), D features, E experts, E' = E + 1 router columns
with a hole expert (column E is the hole), k experts per token, C tokens per expert (expert choice),
A = number of (token, expert) assignments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .noise import GaussianNoiseStd, gumbel_like, validate_noise

SCORE_FUNCS = ("softmax", "sigmoid")
_ROUTER_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Routing:
    """What the router decided in one forward. Read by dispatch, aux losses, statistics and plots.

    Attributes:
        mode: ``"token_choice"`` or ``"expert_choice"``.
        num_experts: E, real experts (the hole is not one of them).
        hole: whether router column E is a hole expert.
        logits: (T, E') clean router logits, float32.
        noisy_logits: (T, E') logits after training noise (the same tensor as ``logits`` without noise).
        noise_std: (T, E') learned Gaussian noise std, or None.
        probs: (T, E') scores that selection used: softmax (or sigmoid) of ``noisy_logits / temperature``.
        indices: token choice: (T, k) chosen router columns per token, best first (E = hole);
            expert choice: (E', C) chosen token ids per column.
        weights: same shape as ``indices``: the combine weight of each choice.
        token_index: (A,) token id of each assignment, grouped by column in column order.
        expert_index: (A,) router column of each assignment, non-decreasing.
        weight: (A,) combine weight of each assignment.
        count: (E',) long, assignments per router column (``count[E]`` is the hole's), on the routing's device.
        tokens_shape: leading shape of the routed input, ``prod(tokens_shape) == T``.
        dropped: 0-dim long tensor; token choice: slots sent to the hole; expert choice: tokens that no
            real expert picked. Every token slot is either processed or counted here.
        host_counts: ``count`` as host ints when the router already has them; else read back on first use of
            :attr:`counts` (on a GPU that read is the forward's one synchronisation, and a fused grouped-mm
            forward never makes it).
    """

    mode: str
    num_experts: int
    hole: bool
    logits: torch.Tensor
    noisy_logits: torch.Tensor
    noise_std: Optional[torch.Tensor]
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    tokens_shape: Tuple[int, ...]
    dropped: torch.Tensor
    host_counts: Optional[Tuple[int, ...]] = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Routing({self.mode}, tokens={self.num_tokens}, experts={self.num_experts}, hole={self.hole}, "
                f"counts={list(self.counts)}, dropped={int(self.dropped)})")

    @property
    def counts(self) -> Tuple[int, ...]:
        """E' host ints, assignments per router column (``counts[E]`` is the hole's)."""
        if self.host_counts is None:
            object.__setattr__(self, "host_counts", tuple(self.count.tolist()))  # a cache, not a new value
        return self.host_counts

    @property
    def num_tokens(self) -> int:
        """T: tokens routed (masked-out padding excluded)."""
        return self.logits.shape[0]

    @property
    def num_inputs(self) -> int:
        """Tokens in the input, ``prod(tokens_shape)``; token ids in the record index these."""
        return math.prod(self.tokens_shape)

    @property
    def load(self) -> torch.Tensor:
        """(E,) long: tokens each real expert processed."""
        return torch.tensor(self.counts[: self.num_experts], dtype=torch.long)

    @property
    def num_assigned(self) -> int:
        """Assignments that reach a real expert: ``sum(load)``."""
        return sum(self.counts[: self.num_experts])


class Router(nn.Module):
    """Linear gate with optional training noise.

    Args:
        input_dim: D.
        num_columns: E' router columns.
        noise: None, ``"gumbel"``, ``"gaussian"`` or ``"jitter"`` (see :mod:`moefy.noise`).
        temperature: logits are divided by it before the score function (seed 001's gate temperature).
        score_func: ``"softmax"`` over columns, or an independent ``"sigmoid"`` per column.
        jitter_eps: half-width of the multiplicative input jitter.
    """

    def __init__(self, input_dim: int, num_columns: int, noise: Optional[str] = None,
                 temperature: float = 1.0, score_func: str = "softmax", jitter_eps: float = 1e-2):
        super().__init__()
        self.noise = validate_noise(noise)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        for name, value in (("input_dim", input_dim), ("num_columns", num_columns)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, (int, float)) or not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be a number in [0, 1), got {jitter_eps!r}")
        self.gate = nn.Linear(input_dim, num_columns, bias=False)
        self.noise_std = GaussianNoiseStd(input_dim, num_columns) if self.noise == "gaussian" else None
        self.temperature = float(temperature)
        self.score_func = score_func
        self.jitter_eps = jitter_eps

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


def expert_capacity(num_tokens: int, num_columns: int, k: float, capacity_factor: float,
                    capacity: Optional[int] = None) -> int:
    """C = ``capacity`` if given, else ``ceil(capacity_factor * T * k / E')``; never more than T."""
    c = capacity if capacity is not None else math.ceil(capacity_factor * num_tokens * k / num_columns)
    return min(int(c), num_tokens)


def token_choice(probs: torch.Tensor, k: int, normalize: bool = True):
    """Each token picks its top-k columns.

    Args:
        probs: (T, E') scores.
        k: experts per token.
        normalize: renormalise the k weights to sum to one. At k = 1 that weight is the constant 1, which
            would give the router no gradient; moefy then uses ``p / stopgrad(p)`` instead: value exactly 1,
            gradient that of ``p`` (straight-through).
    Returns:
        indices (T, k) long, weights (T, k), token_index (T*k,), expert_index (T*k,), weight (T*k,),
        grouped by column (stable, so tokens keep their order inside a column).
    """
    vals, idx = top_k(probs, k)
    if normalize:
        vals = vals / vals.detach() if k == 1 else vals / vals.sum(dim=-1, keepdim=True)
    return (idx, vals, *group_by_column(idx, vals))


def count_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) long: how often each id in [0, size) occurs in ``ids`` (router columns, tokens), on its device.

    ``bincount`` on CUDA reads the maximum back to the host first (a synchronisation); ``index_add_`` does not.
    """
    if ids.is_cuda:
        return ids.new_zeros(size).index_add_(0, ids, torch.ones_like(ids))
    return torch.bincount(ids, minlength=size)


def group_by_column(indices: torch.Tensor, weights: torch.Tensor):
    """Flatten token-choice picks (T, k) into assignments grouped by column with one stable sort:
    ``(token_index, expert_index, weight)``, each (T*k,); tokens keep their order inside a column."""
    k = indices.shape[1]
    expert_index, order = indices.reshape(-1).sort(stable=True)
    token_index = order if k == 1 else torch.div(order, k, rounding_mode="floor")
    return token_index, expert_index, weights.reshape(-1).index_select(0, order)


def top_k(probs: torch.Tensor, k: int):
    """``probs.topk(k, dim=-1)`` for (T, E') scores ≥ 0: (values, indices), best first.

    On CPU, ``topk`` over many short rows costs 10-20x a ``max`` over them (12.8 ms vs 0.6 ms at T=8192,
    E'=64), so for small k it takes k maxima instead, masking each winner before the next (``max``, not
    ``argmax``: 4x faster on rows of 8). On CUDA ``topk`` is one kernel.
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


def expert_choice(probs: torch.Tensor, capacity: int):
    """Each column picks its top-C tokens (Zhou et al. 2022); weights are the raw scores.

    Args:
        probs: (T, E') scores.
        capacity: C ≤ T.
    Returns:
        indices (E', C) token ids, weights (E', C), token_index (E'*C,), expert_index (E'*C,), weight (E'*C,).
    """
    num_columns = probs.shape[1]
    vals, tok = probs.t().topk(capacity, dim=-1)
    expert_index = torch.arange(num_columns, device=probs.device).repeat_interleave(capacity)
    return tok, vals, tok.reshape(-1), expert_index, vals.reshape(-1)
