"""A small k-means (Lloyd's iterations from a k-means++ start) in torch, float64, deterministic for a seed.

Used by :func:`~moefy.convert.router_init.init_router` (``method="kmeans"``) to place router rows at the
centroids of a layer's router inputs; no scikit-learn needed.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..checks import check_int, check_tensor

__all__ = ["kmeans"]


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (N, D), c (K, D) → (N, K) squared Euclidean distances, clamped at 0 (rounding)."""
    return (x.square().sum(1, keepdim=True) - 2 * x @ c.T + c.square().sum(1)).clamp_min(0)


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ∝ D(x)²."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).square().sum(1)                                   # (N,)
    for _ in range(1, k):
        weights = d2.cpu() if float(d2.sum()) > 0 else torch.ones(n, dtype=torch.float64)  # all points equal
        pick = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(x[pick])
        d2 = torch.minimum(d2, (x - x[pick]).square().sum(1))
    return torch.stack(centres)                                           # (K, D)


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N,) nearest centre of every point; an empty cluster takes the point farthest from its own centre."""
    d = _sq_dists(x, c)                                                   # (N, K)
    labels = d.argmin(1)                                                  # (N,)
    k = c.shape[0]
    for j in range(k):
        counts = torch.bincount(labels, minlength=k)
        if counts[j] > 0:
            continue
        own = d.gather(1, labels[:, None]).squeeze(1).clone()             # (N,) distance to own centre
        own[counts[labels] <= 1] = -1.0                                   # never empty another cluster
        labels[int(own.argmax())] = j
    return labels


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(K, D) mean of every cluster (none is empty after :func:`_assign`)."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums / torch.bincount(labels, minlength=k).to(x.dtype)[:, None]


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100) -> Tuple[torch.Tensor, torch.Tensor]:
    """k-means of the rows of ``x``.

    Args:
        x: (N, D) points, N ≥ k; computed in float64.
        k: clusters.
        seed: seeds the k-means++ start (a CPU generator of its own: the global RNG is untouched).
        iters: at most this many Lloyd iterations (it stops when no point changes cluster).
    Returns:
        ``(centroids (k, D) float64, labels (N,) int64)``: every centroid is exactly the mean of the points
        labelled with it.
    """
    check_tensor(x, "x", floating=True)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    check_int(k, "k", min=1)
    check_int(seed, "seed")
    check_int(iters, "iters", min=1)
    if x.shape[0] < k:
        raise ValueError(f"x: k-means with k={k} clusters needs at least {k} points, got {x.shape[0]}")
    x = x.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    labels = _assign(x, _plus_plus(x, k, gen))
    for _ in range(iters):
        new = _assign(x, _means(x, labels, k))
        if torch.equal(new, labels):
            break
        labels = new
    return _means(x, labels, k), labels
