"""Make MoE models smaller from what their routers do: score experts on calibration data, prune the least
important, or merge similar ones; :func:`moefy.hf.export` then writes the smaller model.

- :func:`expert_scores`: ``{block name: (E,)}`` scores (``"frequency"``, ``"soft"``, ``"reap"``, ``"ean"``).
- :func:`prune_experts`: keep the highest-scoring experts of every block.
- :func:`merge_experts`: cluster experts by their outputs and average each cluster (HC-SMoE).
"""
from .calibrate import ExpertStats, calibrate
from .merge import MERGE_METHODS, cluster_experts, merge_experts
from .prune import prune_experts
from .scores import SCORE_METHODS, expert_scores

__all__ = ["expert_scores", "prune_experts", "merge_experts", "SCORE_METHODS", "MERGE_METHODS", "calibrate",
           "ExpertStats", "cluster_experts"]
