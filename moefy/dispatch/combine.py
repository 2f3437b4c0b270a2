"""Sort-based sparse dispatch: gather → experts → combine. Each expert runs only on its own tokens.

The routing record already lists the assignments grouped by router column, so dispatch is one gather into
contiguous per-expert slices, one call of the execution seam (:mod:`moefy.dispatch.experts`), and one
weighted ``index_add_`` back into token order. The hole is the last column: its assignments are a tail that
is never gathered. A token the router could not score (a non-finite score: routed nowhere, see
:mod:`moefy.routing.select`) gets a NaN output, as a dense layer would give it, not a clean-looking zero.
"""
from __future__ import annotations

import torch

from ..fastpaths import add_rows, count_ids
from ..routing.record import Routing
from .experts import FusedExperts, RunExpert
from .fused import runs_grouped

AGGREGATIONS = ("sum", "mean")


def dispatch(x: torch.Tensor, routing: Routing, experts, run_expert: RunExpert,
             aggregation: str = "sum") -> torch.Tensor:
    """Route ``x`` through the experts the record names and combine the weighted outputs.

    Args:
        x: (T, *F) tokens (or whole samples), the rows the record routed.
        routing: the record for these T rows.
        experts: an execution-seam implementation (:mod:`moefy.dispatch.experts`).
        run_expert: ``run_expert(e, x_e, token_ids_e)`` runs expert e on its rows (n_e, *F).
        aggregation: ``"sum"``: ``y_t = sum_i w_ti f_i(x_t)``; ``"mean"``: that sum divided by the number
            of real experts that processed token t (tokens nobody processed stay zero).
    Returns:
        y: (T, *F_out); NaN rows for the tokens routed nowhere for a non-finite score.
    """
    if routing.host_counts is None and not _runs_without_counts(experts, x):
        routing.counts  # the execution reads them anyway; read first, the lists hold only what they count
    assigned = routing.num_assigned                                   # A: the hole's tail is never run
    token_index, weight = routing.token_index, routing.weight
    if token_index.shape[0] != assigned:  # (slicing costs an op: µs per forward when decoding)
        token_index, weight = token_index[:assigned], weight[:assigned]  # (A,) each
    rows = x.index_select(0, token_index)                             # (A, *F), grouped by expert
    out = experts(rows, token_index, routing, run_expert)             # (A, *F_out)
    y = combine(out, token_index, weight, x.shape[0], aggregation)
    if routing.finite is None:
        return y
    finite = routing.finite if routing.kept is None else ~routing.nonfinite_inputs()  # (T,) bool
    return torch.where(finite.view(-1, *(1,) * (y.dim() - 1)), y, float("nan"))


def _runs_without_counts(experts, x: torch.Tensor) -> bool:
    """Whether ``experts`` runs every row as one grouped mm, which finds the experts' rows on the device (the
    one execution that reads no host counts, and runs any non-finite tail of the lists harmlessly)."""
    if not isinstance(experts, FusedExperts) or x.dim() != 2 or not runs_grouped(experts.experts, experts.layout, x):
        return False
    fusable = getattr(experts, "fusable", None)  # False while a wrapper (PEFT, hooks) makes it run looped
    return fusable is None or fusable(x.device.type)


def combine(out: torch.Tensor, token_index: torch.Tensor, weight: torch.Tensor, num_tokens: int,
            aggregation: str = "sum") -> torch.Tensor:
    """Weighted sum of expert outputs back into token order.

    Args:
        out: (A, *F_out) expert outputs, one row per assignment.
        token_index: (A,) token of each row.
        weight: (A,) combine weight of each row.
        num_tokens: T.
        aggregation: ``"sum"``, or ``"mean"`` (divided by the number of rows each token received).
    Returns:
        y: (T, *F_out); tokens with no row are zero.
    """
    if weight.dtype != out.dtype:
        weight = weight.to(out.dtype)
    if aggregation == "mean":
        per_token = count_ids(token_index, num_tokens).clamp_(min=1)
        weight = weight / per_token.index_select(0, token_index).to(out.dtype)
    if num_tokens == 1 and out.dim() == 2:  # one token (decoding): one product, 2 ops instead of 4 (µs each)
        return (weight @ out).unsqueeze(0)
    out = out * weight.reshape((-1,) + (1,) * (out.dim() - 1))
    return add_rows(out.new_zeros((num_tokens, *out.shape[1:])), token_index, out)
