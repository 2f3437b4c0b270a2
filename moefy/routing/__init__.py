"""Routing: the router, what it decides, and the losses computed from its decisions.

- ``record``: :class:`Routing`, the record of one forward's routing decisions (read by dispatch, losses, stats).
- ``router``: :class:`Router`, the linear gate with optional training noise; ``router_dtype``, ``SCORE_FUNCS``.
- ``select``: token choice / expert choice selection, ``top_k``, ``group_by_column``, ``expert_capacity``.
- ``noise``: training noise for the router (Gumbel, learned Gaussian std, input jitter).
- ``losses``: auxiliary load-balancing losses, ``AUX_LOSSES``.
"""
from .losses import (AUX_LOSSES, balance_loss, cv2_loss, cv_squared, entropy_loss, importance, prob_loss,
                     smooth_load, switch_loss, z_loss)
from .noise import NOISE_KINDS, GaussianNoiseStd, gumbel_like, validate_noise
from .record import Routing
from .router import SCORE_FUNCS, Router, router_dtype
from .select import count_ids, expert_capacity, expert_choice, group_by_column, token_choice, top_k

__all__ = [
    "Routing", "Router", "router_dtype", "SCORE_FUNCS",
    "token_choice", "expert_choice", "top_k", "group_by_column", "expert_capacity", "count_ids",
    "NOISE_KINDS", "gumbel_like", "GaussianNoiseStd", "validate_noise",
    "AUX_LOSSES", "cv_squared", "importance", "smooth_load", "entropy_loss", "prob_loss", "cv2_loss",
    "switch_loss", "z_loss", "balance_loss",
]
