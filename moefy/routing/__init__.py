"""Routing: the router, what it decides, and the losses computed from its decisions.

- ``record``: :class:`Routing`, the record of one forward's routing decisions (read by dispatch, losses, stats).
- ``router``: :class:`Router`, the linear gate with optional training noise; ``router_dtype``, ``SCORE_FUNCS``.
- ``select``: selection strategies (token choice, DeepSeek-V3's group-limited token choice, expert choice)
  → :class:`Selection`; :data:`SELECTIONS`; :func:`cap_columns`, token choice's capacity.
- ``route``: :func:`route`, rows and a config → the record (gate → noise → scores → selection).
- ``noise``: training noise for the router (Gumbel, learned Gaussian std, input jitter).
- ``replay``: :class:`RouterReplay`, record a forward's routing decisions and replay them later.
- ``bias_balance``: aux-loss-free load balancing of the selection bias, :func:`update_selection_bias`.
- ``losses``: auxiliary load-balancing losses, ``AUX_LOSSES``.
"""
from .bias_balance import BiasBalance, bias_update, update_selection_bias
from .losses import (AUX_LOSSES, GlobalBalance, balance_loss, cv2_loss, cv_squared, entropy_loss,
                     global_switch_loss, importance, prob_loss, reset_global_balance, seq_balance_loss,
                     smooth_load, switch_loss, z_loss)
from .noise import NOISE_KINDS, GaussianNoiseStd, gumbel_like, validate_noise
from .record import Routing
from .replay import REPLAY_WEIGHTS, Replayed, RouterReplay, replay_selection
from .router import SCORE_FUNCS, Router, router_dtype
from .route import route
from .select import (SELECTIONS, Selection, cap_columns, combine_weights, expert_capacity, expert_choice,
                     from_picks, group_by_column, group_limited_token_choice, select, strategy_name,
                     token_choice)

__all__ = [
    "Routing", "Router", "router_dtype", "SCORE_FUNCS",
    "BiasBalance", "bias_update", "update_selection_bias",
    "RouterReplay", "Replayed", "replay_selection", "REPLAY_WEIGHTS",
    "route", "select", "Selection", "SELECTIONS", "token_choice", "expert_choice", "from_picks", "group_by_column",
    "expert_capacity", "cap_columns", "group_limited_token_choice", "combine_weights", "strategy_name",
    "NOISE_KINDS", "gumbel_like", "GaussianNoiseStd", "validate_noise",
    "AUX_LOSSES", "cv_squared", "importance", "smooth_load", "entropy_loss", "prob_loss", "cv2_loss",
    "switch_loss", "z_loss", "balance_loss", "seq_balance_loss", "global_switch_loss", "GlobalBalance",
    "reset_global_balance",
]
