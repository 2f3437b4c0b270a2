"""Classification metrics: accuracy, negative log-likelihood, expected calibration error, reliability bins.

Every function takes class probabilities ``probs`` (N, C), rows summing to one (``logits.softmax(-1)``),
and integer targets (N,). Confidence is the top probability of a row; a prediction is its argmax.

ECE follows Guo et al. (2017): confidences fall in ``n_bins`` equal-width bins ``(b/n, (b+1)/n]`` (a
confidence of exactly 0 goes to the first bin) and ``ECE = Σ_b (n_b / N) · |acc_b − conf_b|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..checks import check_int, check_number

__all__ = ["accuracy", "nll", "ece", "reliability_bins", "ReliabilityBins", "classification_report"]


def _check(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor of shape (N, C), got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    if not isinstance(targets, torch.Tensor) or targets.shape != probs.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor of shape (N,) = ({probs.shape[0]},), got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if probs.shape[0] == 0:
        raise ValueError("probs and targets must hold at least one sample")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1] - 1}]")


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the target. ``probs`` may also be logits (same argmax)."""
    _check(probs, targets)
    return float((probs.argmax(dim=-1) == targets).double().mean())


def nll(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``−mean_i log probs[i, targets[i]]`` (probabilities clamped at ``eps``)."""
    _check(probs, targets)
    check_number(eps, "eps", low=0, high=1, low_open=True, high_open=True,
                 what="a number in (0, 1), the smallest probability")
    picked = probs.double().gather(1, targets.view(-1, 1)).squeeze(1)
    return float(-picked.clamp_min(eps).log().mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (B equal-width confidence bins).

    Attributes:
        edges: (B + 1,) bin edges, 0 … 1.
        counts: (B,) samples per bin.
        confidence: (B,) mean confidence per bin (NaN for empty bins).
        accuracy: (B,) accuracy per bin (NaN for empty bins).
    """

    edges: torch.Tensor
    counts: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor

    @property
    def ece(self) -> float:
        """``Σ_b (n_b / N) · |acc_b − conf_b|`` over the non-empty bins."""
        full = self.counts > 0
        gap = (self.accuracy[full] - self.confidence[full]).abs()
        return float((self.counts[full].double() * gap).sum() / self.counts.sum())


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bin the predictions by confidence into ``n_bins`` equal-width bins ``(b/n, (b+1)/n]``."""
    _check(probs, targets)
    check_int(n_bins, "n_bins", min=1)
    conf, pred = probs.double().max(dim=-1)
    correct = (pred == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(conf, edges[1:-1], right=False)  # (edges[b], edges[b+1]] → b; 0 → bin 0
    counts = torch.bincount(index, minlength=n_bins)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    denom = counts.double()
    nan = torch.full_like(denom, float("nan"))
    return ReliabilityBins(
        edges=edges, counts=counts,
        confidence=torch.where(counts > 0, sum_conf / denom.clamp_min(1), nan),
        accuracy=torch.where(counts > 0, sum_acc / denom.clamp_min(1), nan))


def ece(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (15 by default)."""
    return reliability_bins(probs, targets, n_bins).ece


def classification_report(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> Dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of ``probs`` (N, C) against ``targets`` (N,)."""
    return {"accuracy": accuracy(probs, targets), "nll": nll(probs, targets), "ece": ece(probs, targets, n_bins)}
