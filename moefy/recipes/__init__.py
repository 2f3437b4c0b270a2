"""Recipes: a ready-made MoE layer, mutual distillation, and calibration metrics.

- ``sparse_moe``: :class:`MoE`, seed 000's sparsely-gated MoE layer (MLP experts, noisy top-k gate, cv² loss).
- ``distill``: mutual distillation between the experts (seed 003).
- ``metrics``: accuracy, NLL, ECE, reliability bins.
- ``reliability``: reliability diagrams (matplotlib); not imported here, so that ``import moefy`` does not
  load matplotlib: ``from moefy.recipes.reliability import plot_reliability``.
"""
from . import metrics
from .distill import block_distillation_loss, expert_logits, mode_loss, mutual_distillation_loss
from .metrics import ReliabilityBins, accuracy, classification_report, ece, nll, reliability_bins
from .sparse_moe import MLPExpert, MoE

__all__ = [
    "MoE", "MLPExpert", "mutual_distillation_loss", "mode_loss", "expert_logits", "block_distillation_loss",
    "metrics", "accuracy", "nll", "ece", "reliability_bins", "ReliabilityBins", "classification_report",
]
