"""Routing produces the record: rows and a config in, one :class:`~moefy.routing.record.Routing` out."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import RoutingConfig
from .record import Routing
from .replay import Replayed, replay_selection
from .router import Router
from .select import select
from .simple import simple_subset


def route(router: Router, x: torch.Tensor, config: RoutingConfig, num_experts: int,
          tokens_shape: Optional[Tuple[int, ...]] = None, kept: Optional[torch.Tensor] = None,
          replay: Optional[Replayed] = None) -> Routing:
    """Route T rows ``x`` (T, D): gate → noise → scores → (sampler) → selection (with the router's
    selection bias) → the record.

    ``tokens_shape``: the leading shape of the input the rows came from (default (T,)); ``kept`` (T,): the
    rows' ids among all input tokens when some were masked out; ``replay``: recorded (T, k) picks to take
    instead of selecting (:mod:`moefy.routing.replay`).
    """
    scores = router(x)                                   # logits, noisy_logits, noise_std, probs: (T, E')
    if replay is not None:                               # the recorded picks, weighted as replay.mode says
        picked = replay_selection(scores[3], replay, config, num_experts)
        return Routing.build(scores, picked, num_experts, config.hole, tokens_shape, kept, config.null_columns)
    subset = None
    if config.noise == "simple" and router.training:     # SIMPLE: k-hot (T, E'), marginals' gradient
        subset = simple_subset(scores[1] / config.temperature, config.k)
    bias = router.score_correction_bias                  # (E',) for selection only, or None
    picked = select(scores[3], config, num_experts, subset, bias)  # assignments grouped by column
    return Routing.build(scores, picked, num_experts, config.hole, tokens_shape, kept, config.null_columns)
