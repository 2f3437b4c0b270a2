"""Router replay: record the routing decisions of a forward, replay them in a later forward on the same tokens.

Uses: activation recomputation (the recomputed forward must send every token to the experts it went to the
first time, whatever the noise), and an RL policy update that must see the rollout's routing. A replayed
forward runs the router as usual, then takes the recorded (T, k) picks instead of selecting: they go through
:func:`~moefy.routing.select.from_picks` and :meth:`Routing.build` like any selection, so dispatch, the
record, ``load + dropped == T·k`` and the aux losses see nothing special. The combine weights are either

* ``"recompute"`` (the default): the current router's scores at the replayed columns, normalised as
  token choice does (``normalize``), so the router gets the gradient of this forward at the recorded choices,
  which is what both uses need (recomputation must reproduce the original gradient, a policy update must
  differentiate the current policy at the rollout's actions). The scores are this forward's, noise included
  (``torch.utils.checkpoint`` restores the RNG state, so a recomputed forward draws the same noise);
* ``"frozen"``: the recorded weights, constants: the router gets no gradient through the combine.

A replayed forward runs no sampler (``noise="simple"``): its picks are given, so its weights are the plain
scores, without the sampler's gradient term.

Usage::

    replay = RouterReplay(model)              # every MoEBlock of model
    with replay.record():
        out = model(x)                        # each block keeps its (T, k) indices and weights, per call
    with replay.replay(weights="recompute"):
        out = model(x)                        # the same experts for every token

Each block keeps a list of its recorded calls and replays them in the same order (a block called twice per
forward replays its two calls in turn); every ``replay()`` starts again from the first, so several epochs
over one rollout replay it each time. With activation checkpointing the recomputation happens during
``backward()``: call it inside ``replay()``. ``torch.utils.checkpoint`` needs ``use_reentrant=True`` there:
the replayed forward builds a slightly different graph (a gather at the recorded columns instead of the
top-k), which the non-reentrant checkpoint's saved-tensor check rejects (with its default
``preserve_rng_state=True`` it also redraws the same noise, so it reproduces the routing without a replay).

Token choice only. Indices refer to the routed tokens: with ``token_mask``, the T rows that were kept, so
the replayed forward must use the same mask. Under expert parallelism each rank records and replays its own
tokens' picks (columns are global expert ids, rows are the rank's tokens): replay is local, no communication.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from ..checks import check_choice
from ..config import RoutingConfig
from .record import Routing
from .select import Selection, combine_weights, from_picks, with_capacity

REPLAY_WEIGHTS = ("recompute", "frozen")


@dataclass(frozen=True)
class Replayed:
    """One recorded call of one block: ``indices`` (T, k) long router columns, ``weights`` (T, k) the
    recorded combine weights (detached), how to weight the replay (``"recompute"`` / ``"frozen"``), and the
    recorded scores (T, E') (detached) that a token-choice capacity ranks the picks by, so a replay drops
    exactly the slots the recorded forward dropped."""

    indices: torch.Tensor
    weights: torch.Tensor
    mode: str = "recompute"
    scores: Optional[torch.Tensor] = None


def replay_selection(probs: torch.Tensor, replayed: Replayed, config: RoutingConfig, num_experts: int) -> Selection:
    """The recorded picks as this forward's selection; ``probs`` (T, E') are the current router's scores."""
    num_tokens, num_columns = probs.shape
    idx = replayed.indices
    if idx.dim() != 2 or idx.shape[0] != num_tokens:
        raise ValueError(f"router replay: indices were recorded with shape {tuple(idx.shape)} but this forward "
                         f"routes T={num_tokens} tokens; indices must have shape (T, k) for the same routed "
                         "tokens (same input, same token_mask)")
    if idx.shape[1] != config.k:
        raise ValueError(f"router replay: indices pick k={idx.shape[1]} columns per token but the block has "
                         f"k={config.k}")
    idx = idx.to(probs.device)
    if replayed.mode == "frozen":
        vals = replayed.weights.to(probs.device, probs.dtype)                   # (T, k) constants
    else:
        vals = combine_weights(probs.gather(-1, idx), config)                   # (T, k)
    picked = from_picks(idx, vals, num_columns, num_experts, config.zero_columns)
    ranked_by = replayed.scores.to(probs.device) if replayed.scores is not None else probs
    return with_capacity(picked, ranked_by, config, num_experts)  # the recorded drops, by the recorded scores


class _Slot:
    """What a block's ``route_rows`` consults: ``take()`` the next replayed call (None while recording),
    ``keep(routing)`` after routing (appends while recording)."""

    def __init__(self, calls: List[Replayed], mode: Optional[str], name: str):
        self.calls, self.mode, self.name, self.next = calls, mode, name, 0

    def take(self) -> Optional[Replayed]:
        if self.mode is None:
            return None
        if self.next >= len(self.calls):
            raise RuntimeError(f"router replay: {self.name} recorded {len(self.calls)} call(s) and this is call "
                               f"{self.next + 1}; record the same forwards you replay")
        call = self.calls[self.next]
        self.next += 1
        return Replayed(call.indices, call.weights, self.mode, call.scores)

    def keep(self, routing: Routing) -> None:
        if self.mode is None:
            self.calls.append(Replayed(routing.indices.detach(), routing.weights.detach(),
                                       scores=routing.probs.detach()))


class RouterReplay:
    """Records and replays the routing of every MoEBlock of ``model`` (see the module docstring).

    Attributes:
        records: module name → the list of that block's recorded calls (:class:`Replayed`), in call order.
    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no MoEBlock in ``model``, or one routes by expert choice.
    """

    def __init__(self, model: nn.Module):
        from ..block import MoEBlock  # the block imports routing: import it when used
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.blocks = {name or ".": m for name, m in model.named_modules() if isinstance(m, MoEBlock)}
        if not self.blocks:
            raise ValueError(f"model contains no MoEBlock to record ({type(model).__name__})")
        for name, block in self.blocks.items():
            if block.expert_choice:
                raise ValueError(f"router replay supports token choice only; {name} ({block.moe_name}) uses "
                                 "expert choice, whose picks depend on the whole batch")
        self.records: Dict[str, List[Replayed]] = {name: [] for name in self.blocks}

    @contextlib.contextmanager
    def record(self) -> Iterator["RouterReplay"]:
        """Inside, every call of every block appends its picks to ``records`` (earlier records are cleared)."""
        self.records = {name: [] for name in self.blocks}
        with self._slots(None):
            yield self

    @contextlib.contextmanager
    def replay(self, weights: str = "recompute") -> Iterator["RouterReplay"]:
        """Inside, every block takes its recorded picks in order instead of selecting.

        ``weights``: ``"recompute"`` (current router scores at the recorded columns, gradient to the router)
        or ``"frozen"`` (the recorded weights)."""
        check_choice(weights, "weights", REPLAY_WEIGHTS)
        if not any(self.records.values()):
            raise RuntimeError("router replay: nothing recorded yet; run the forward inside record() first")
        with self._slots(weights):
            yield self

    @contextlib.contextmanager
    def _slots(self, mode: Optional[str]):
        for block in self.blocks.values():
            if block.router_replay is not None:
                raise RuntimeError(f"{block.moe_name} is already recording or replaying")
        try:
            for name, block in self.blocks.items():
                block.router_replay = _Slot(self.records[name], mode, name)
            yield
        finally:
            for block in self.blocks.values():
                block.router_replay = None
