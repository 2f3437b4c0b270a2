"""How much each expert matters, from one pass over calibration data: :func:`expert_scores`.

For expert j of a block, over the calibration tokens x the block routed (its router's picks, g_j(x) the combine
weight of j for x, f_j(x) the expert's output, flattened):

- ``"frequency"``: the token slots routed to j (assignments it ran, after any capacity drops);
- ``"soft"``: Σ_x p_j(x), its router probability (the record's ``probs``: softmax or sigmoid) over all tokens;
- ``"reap"``: mean over the tokens routed to j of g_j(x)·‖f_j(x)‖₂ (REAP, Lasby et al. 2025, router-weighted
  expert activation pruning); 0 for an expert no token reached;
- ``"ean"``: Σ over the tokens routed to j of ‖f_j(x)‖₂ (expert activation norm).

Higher is more important; :func:`~moefy.compress.prune_experts` keeps the highest.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable

import torch
from torch import nn

from ..checks import check_choice
from .calibrate import ExpertStats, calibrate

__all__ = ["SCORE_METHODS", "expert_scores", "scores_from_stats"]

SCORE_METHODS = ("frequency", "soft", "reap", "ean")


def scores_from_stats(stats: ExpertStats, method: str) -> torch.Tensor:
    """The (E,) float64 scores ``method`` gives from one block's :class:`~moefy.compress.calibrate.ExpertStats`."""
    check_choice(method, "method", SCORE_METHODS)
    if method == "frequency":
        return stats.frequency.clone()
    if method == "soft":
        return stats.soft.clone()
    if method == "ean":
        return stats.norm.clone()
    return torch.where(stats.frequency > 0, stats.weighted_norm / stats.frequency.clamp(min=1), 0.0)


def expert_scores(model: nn.Module, data: Iterable[Any], method: str = "reap") -> Dict[str, torch.Tensor]:
    """Score every expert of every MoE block of ``model`` on calibration data.

    Args:
        model: a moefied model or one imported by :func:`moefy.hf.from_hf` (any module holding MoEBlocks).
        data: an iterable of model inputs (a list of batches, a DataLoader): a tensor is passed as
            ``model(batch)``, a mapping as ``model(**batch)``, a tuple as ``model(*batch)``. Run once, in eval
            mode, without gradients.
        method: ``"frequency"``, ``"soft"``, ``"reap"`` or ``"ean"`` (see the module docstring).
    Returns:
        ``{block name: scores (E,)}``, float64 on the CPU, block names as in ``model.named_modules()``.
    Raises:
        ValueError: an unknown ``method``, a model without MoE blocks, data that reaches none of them.
    """
    check_choice(method, "method", SCORE_METHODS)
    stats = calibrate(model, data, outputs=False)
    return {name: scores_from_stats(s, method) for name, s in stats.items()}
