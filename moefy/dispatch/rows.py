"""An input as router rows: per token ``x (..., D) → (T, D)``, or per sample ``x (B, ...) → (B, D)`` features
for the router while the experts get whole samples; padding masks; per-row side inputs for the experts."""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from einops import reduce


def as_rows(x: torch.Tensor, route: str, input_dim: int, feature_dim: int = -1):
    """``(rows, router_in, tokens_shape)``: what the experts get (T, *F), what the router reads (T, D), and
    the input's routed leading shape (``x.shape[:-1]`` per token, (B,) per sample)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if route == "tokens":
        if x.dim() == 0 or x.shape[-1] != input_dim:
            raise ValueError(f"x must have shape (..., input_dim={input_dim}), got {tuple(x.shape)}")
        rows = x.reshape(-1, input_dim)
        return rows, rows, tuple(x.shape[:-1])
    if not -x.dim() <= feature_dim < x.dim():
        raise ValueError(f"feature_dim={feature_dim} is not a dim of x with shape {tuple(x.shape)}")
    if x.dim() < 2 or x.shape[feature_dim] != input_dim:
        raise ValueError(f"x must have shape (B, ...) with input_dim={input_dim} features on dim "
                         f"{feature_dim} for route='samples', got {tuple(x.shape)}")
    feats = reduce(x.movedim(feature_dim, -1), "b ... d -> b d", "mean") if x.dim() > 2 else x
    return x, feats, (x.shape[0],)


def kept_rows(token_mask: torch.Tensor, tokens_shape: Tuple[int, ...]) -> torch.Tensor:
    """(T_kept,) ids of the real tokens of a bool ``token_mask`` of the tokens' shape (True = real token)."""
    if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
        raise TypeError(f"token_mask must be a bool tensor (True = real token), got "
                        f"{getattr(token_mask, 'dtype', type(token_mask).__name__)}")
    if tuple(token_mask.shape) != tuple(tokens_shape):
        raise ValueError(f"token_mask must have the tokens' shape {tuple(tokens_shape)}, "
                         f"got {tuple(token_mask.shape)}")
    return token_mask.reshape(-1).nonzero().squeeze(1)


class _Rows:
    """A side input flattened to one row per routed token / sample."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows


def with_side_inputs(expert_forward: Callable, experts: Sequence, tokens_shape: Tuple[int, ...],
                     args: Sequence, kwargs: Dict) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``run_expert(e, x_e, token_ids_e)`` that calls ``expert_forward(experts[e], x_e, *args, **kwargs)``
    with every tensor side input whose leading dims are ``tokens_shape`` sliced to the expert's rows."""
    lead = len(tokens_shape)

    def per_row(v):  # (*tokens_shape, ...) → (T, ...) rows to slice; anything else is passed whole
        if isinstance(v, torch.Tensor) and v.dim() >= lead and tuple(v.shape[:lead]) == tuple(tokens_shape):
            return _Rows(v.reshape(-1, *v.shape[lead:]))
        return v

    args = [per_row(a) for a in args]
    kwargs = {n: per_row(v) for n, v in kwargs.items()}

    def take(v, ids):
        return v.rows.index_select(0, ids) if isinstance(v, _Rows) else v

    def run(e: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return expert_forward(experts[e], x, *(take(a, ids) for a in args),
                              **{n: take(v, ids) for n, v in kwargs.items()})
    return run
