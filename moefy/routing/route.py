"""Routing produces the record: rows and a config in, one :class:`~moefy.routing.record.Routing` out."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import RoutingConfig
from .record import Routing
from .replay import ReplaySlot, check_call, noise_state, redrawn_noise, replay_selection, replayed_sample
from .router import Router
from .select import nonfinite_as_nan, select
from .simple import simple_subset


def route(router: Router, x: torch.Tensor, config: RoutingConfig, num_experts: int,
          tokens_shape: Optional[Tuple[int, ...]] = None, kept: Optional[torch.Tensor] = None,
          replay: Optional[ReplaySlot] = None) -> Routing:
    """Route T rows ``x`` (T, D): gate → noise → scores → (sampler) → selection (with the router's
    selection bias) → the record.

    ``tokens_shape``: the leading shape of the input the rows came from (default (T,)); ``kept`` (T,): the
    rows' ids among all input tokens when some were masked out; ``replay``: the block's slot while a
    :class:`~moefy.routing.replay.RouterReplay` records (the picks and the noise's generator state are kept)
    or replays (the recorded noise is redrawn and the recorded (T, k) picks are taken instead of selecting).
    """
    call = replay.take() if replay is not None else None  # the recorded call to replay; None: select
    if call is not None:
        check_call(call, x.shape[0], config, num_experts + len(config.null_columns) + int(config.hole))
    rng_state, rng_device = noise_state(router, x.device) if replay is not None and call is None else (None, None)
    if call is None:
        scores = router(x)                               # logits, noisy_logits, noise_std, probs: (T, E')
    else:
        with redrawn_noise(call, x.device):              # the noise the recorded forward drew
            scores = router(x)
    scores = nonfinite_as_nan(scores)                    # non-finite logits: NaN scores, routed nowhere
    subset = None
    if config.noise == "simple" and router.training and (call is None or call.mode == "recompute"):
        # SIMPLE: k-hot (T, E') with the exact marginals' gradient; a replay's sample is the recorded picks
        sample = None if call is None else replayed_sample(call, scores[1].shape[1], x.device)
        subset = simple_subset(scores[1] / config.temperature, config.k, sample=sample)
    if call is None:
        bias = router.score_correction_bias              # (E',) for selection only, or None
        picked = select(scores[3], config, num_experts, subset, bias)  # assignments grouped by column
    else:                                                # the recorded picks, weighted as call.mode says
        picked = replay_selection(scores[3], call, config, num_experts, subset)
    routing = Routing.build(scores, picked, num_experts, config.hole, tokens_shape, kept, config.null_columns)
    if replay is not None:
        replay.keep(routing, rng_state, rng_device)
    return routing
