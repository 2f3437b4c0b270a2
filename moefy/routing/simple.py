"""SIMPLE: exact k-subset sampling with exact-marginal gradients.

Ahmed, Zeng, Niepert, Van den Broeck (ICLR 2023), "SIMPLE: A Gradient Estimator for k-Subset Sampling".
Each row of logits ``theta`` (T, E) defines a distribution over subsets ``S`` of exactly ``k`` of its E
columns::

    p(S) = prod_{i in S} sigmoid(theta_i) * prod_{i not in S} (1 - sigmoid(theta_i)) / Z,   |S| = k,

i.e. independent Bernoulli(sigmoid(theta_i)) variables conditioned on their sum being k. In log space,
``a[i, j] = log P(X_1 + ... + X_i = j)`` obeys ``a[0, 0] = 0``, ``a[0, j > 0] = -inf`` and::

    a[i, j] = logaddexp(a[i-1, j] + logsigmoid(-theta_i), a[i-1, j-1] + logsigmoid(theta_i)),

so ``log Z = a[E, k]``. Since ``d log Z / d theta_i = mu_i - sigmoid(theta_i)``, the exact inclusion
marginals are ``mu = grad(log Z) + sigmoid(theta)``. An exact sample walks the table backwards: from
``i = E`` down to 1 with ``j`` still to choose, element ``i`` is included with probability
``sigmoid(theta_i) * P(first i-1 sum to j-1) / P(first i sum to j)``. The SIMPLE estimator's forward value
is that hard sample and its gradient is the gradient of ``mu``: ``z = sample + (mu - mu.detach())``.

Work happens in the logits' dtype, promoted to at least float32. Logits are assumed finite.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..checks import check_int, check_tensor

__all__ = ["log_count_table", "simple_marginals", "simple_sample", "simple_subset"]


def _check(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Validate ``logits`` (floating, 2-D, >= 1 column) and ``k`` (int in [1, E]); return logits in the
    working dtype (at least float32)."""
    check_tensor(logits, "logits", floating=True)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (tokens, experts), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    check_int(k, "k", min=1, max=logits.shape[1])
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) + exp(y)) = hi + log1p(exp(lo - hi))`` with ``hi, lo`` the larger and smaller of ``x, y``.

    The identity holds for either ordering (the order only keeps ``exp``'s argument <= 0), so derivatives of
    every order are exact and finite, ties included. ``torch.logaddexp``'s double backward is NaN once
    ``exp(|x - y|)`` overflows (|x - y| > 88 in float32), and ``F.logsigmoid`` is pathologically slow on small
    CPU tensors when threads are contended, hence this helper."""
    first = x >= y
    hi, lo = torch.where(first, x, y), torch.where(first, y, x)
    return hi + torch.log1p(torch.exp(lo - hi))


def _logsigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log(sigmoid(x)) = -logaddexp(0, -x)``, stable for any finite ``x``."""
    return -_logaddexp(torch.zeros_like(x), -x)


def _table(x: torch.Tensor, k: int) -> torch.Tensor:
    """The DP on already checked and promoted logits ``x`` (T, E); returns (T, E+1, k+1).

    Only the entries ``j <= min(i, k)`` are computed (all finite); the rest are constant ``-inf`` padding, so
    no ``logaddexp(-inf, -inf)`` enters the graph and, with :func:`_logaddexp`, gradients of every order stay
    NaN-free."""
    T, E = x.shape
    lp, lq = _logsigmoid(x), _logsigmoid(-x)
    pad = x.new_full((T, k + 1), float("-inf"))
    prev = x.new_zeros(T, 1)  # a[0, 0] = log 1
    rows = [torch.cat([prev, pad[:, 1:]], dim=1)]
    for i in range(1, E + 1):
        p, q = lp[:, i - 1:i], lq[:, i - 1:i]
        m = min(i - 1, k)  # prev holds a[i-1, 0..m]
        parts = [prev[:, :1] + q]  # j = 0: X_i = 0
        if m >= 1:  # 1 <= j <= m: X_i = 0 or 1
            parts.append(_logaddexp(prev[:, 1:m + 1] + q, prev[:, :m] + p))
        if i <= k:  # j = i: all of X_1..X_i are 1
            parts.append(prev[:, i - 1:i] + p)
        prev = torch.cat(parts, dim=1)  # a[i, 0..min(i, k)]
        rows.append(torch.cat([prev, pad[:, prev.shape[1]:]], dim=1))
    return torch.stack(rows, dim=1)


def log_count_table(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``a[t, i, j] = log P(X_1 + ... + X_i = j)``, ``X_l ~ Bernoulli(sigmoid(logits[t, l]))`` independent.

    logits: (T, E) floating; k: int in [1, E]. Returns (T, E+1, k+1) in the working dtype; entries with
    ``j > i`` are ``-inf`` (probability 0), all others are finite. ``a[:, E, k]`` is ``log Z``.
    Differentiable (to any order) with respect to ``logits``."""
    return _table(_check(logits, k), k)


def _marginals(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, table, promoted logits) of ``logits``, the last two detached. See :func:`simple_marginals`."""
    x = _check(logits, k)
    graph = torch.is_grad_enabled() and logits.requires_grad
    with torch.enable_grad():
        if not graph:
            x = x.detach().requires_grad_()
        a = _table(x, k)
        (g,) = torch.autograd.grad(a[:, -1, k].sum(), x, create_graph=graph)
        mu = g + torch.sigmoid(x)
    return (mu if graph else mu.detach()), a.detach(), x.detach()


def simple_marginals(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inclusion marginals ``mu[t, i] = P(i in S | |S| = k)`` of each row; logits (T, E) -> (T, E).

    Each row sums to k. Computed as ``grad(log Z) + sigmoid(logits)`` with
    ``torch.autograd.grad(create_graph=True)``, so the result is itself differentiable (gradcheck /
    gradgradcheck) whenever ``logits`` requires grad and grad mode is on; otherwise it is returned detached."""
    return _marginals(logits, k)[0]


@torch.no_grad()
def _sample(x: torch.Tensor, a: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Backward sampling through the table ``a`` of the checked, promoted logits ``x``; (T, E) bool."""
    T, E = x.shape
    lp = _logsigmoid(x)
    log_u = torch.log(torch.rand((T, E), generator=generator, device=x.device, dtype=x.dtype))
    out = torch.zeros((T, E), dtype=torch.bool, device=x.device)
    j = torch.full((T,), k, dtype=torch.long, device=x.device)  # elements still to choose
    for i in range(E, 0, -1):
        cur = a[:, i].gather(1, j[:, None])[:, 0]  # log P(first i sum to j)
        prv = a[:, i - 1].gather(1, (j - 1).clamp(min=0)[:, None])[:, 0]  # log P(first i-1 sum to j-1)
        take = log_u[:, i - 1] < lp[:, i - 1] + prv - cur
        take = (take & (j > 0)) | (j >= i)  # exactness despite rounding: none left / all remaining needed
        out[:, i - 1] = take
        j = j - take.long()
    return out


@torch.no_grad()
def simple_sample(logits: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One exact sample of ``S ~ p(S)`` per row, by backward sampling through the DP table.

    logits: (T, E) floating; k: int in [1, E]; generator: for ``torch.rand`` (must be on logits' device).
    Returns a (T, E) bool tensor with exactly k True per row; no gradient."""
    x = _check(logits, k).detach()
    return _sample(x, _table(x, k), k, generator)


def simple_subset(logits: torch.Tensor, k: int, generator: Optional[torch.Generator] = None,
                  sample: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SIMPLE estimator: logits (T, E) -> (T, E) float in the working dtype.

    Its value is a hard exact sample (0/1, exactly k ones per row, from :func:`simple_sample`); its gradient
    is that of the exact marginals: ``z = sample + (mu - mu.detach())`` with ``mu = simple_marginals(logits, k)``.
    ``sample``: a (T, E) bool k-subset drawn before (router replay: the recorded picks) to use instead of
    drawing one; ``generator`` is then unused."""
    mu, a, x = _marginals(logits, k)
    if sample is None:
        sample = _sample(x, a, k, generator)
    elif sample.shape != x.shape or sample.dtype != torch.bool:
        raise ValueError(f"sample must be a bool tensor of the logits' shape {tuple(x.shape)}, got "
                         f"{sample.dtype} {tuple(sample.shape)}")
    return sample.to(mu.dtype) + (mu - mu.detach())  # the bracket is exactly 0: the value is exactly the sample
