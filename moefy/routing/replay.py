"""Router replay: record the routing decisions of a forward, replay them in a later forward on the same tokens.

Uses: activation recomputation (the recomputed forward must send every token to the experts it went to the
first time, whatever the noise), and an RL policy update that must see the rollout's routing. A replayed
forward runs the router as usual, then takes the recorded (T, k) picks instead of selecting: they go through
:func:`~moefy.routing.select.from_picks` and :meth:`Routing.build` like any selection, so dispatch, the
record, ``load + dropped == T·k`` and the aux losses see nothing special.

**Exactness.** With unchanged parameters a replayed forward reproduces the recorded one bit for bit, values
and gradients (router, noise std, experts), under every noise mode, because it replays what the noise did:

* ``"gumbel"``, ``"gaussian"``, ``"jitter"``: recording keeps the state of the device's default random
  generator just before the router ran; the replay runs the router with that state restored (and puts the
  generator back afterwards), so it draws the same Gumbel / Gaussian / jitter samples and applies them to this
  forward's logits (or inputs) the way the recorded forward did: the learned Gaussian std and the jitter keep
  their gradients. The generator outside the router is untouched, so dropout elsewhere draws as it would.
* ``"simple"``: the sampler's k-subset is the recorded picks; the replay gives the SIMPLE estimator that
  subset as its sample (value: the k-hot picks; gradient: the exact marginals' of this forward's logits),
  so the weights keep the sampler's gradient term.

The combine weights are either

* ``"recompute"`` (the default): this forward's scores (the replayed noise included) at the recorded
  columns, normalised as token choice does (``normalize``), so the router gets the gradient of this forward
  at the recorded choices, which is what both uses need (recomputation must reproduce the original gradient,
  a policy update must differentiate the current policy at the rollout's actions);
* ``"frozen"``: the recorded weights, constants: the router gets no gradient through the combine.

With a token-choice capacity the replay drops exactly the slots the recorded forward dropped (it ranks the
picks by the recorded scores). Noise is drawn in training only: a call recorded in eval has no noise to
replay, and a replay in eval applies none.

Usage::

    replay = RouterReplay(model)              # every block of model
    with replay.record():
        out = model(x)                        # each block keeps its (T, k) picks, per call
    with replay.replay(weights="recompute"):
        out = model(x)                        # the same experts for every token

Each block keeps a list of its recorded calls and replays them in the same order (a block called twice per
forward replays its two calls in turn); every ``replay()`` starts again from the first, so several epochs
over one rollout replay it each time. A call counts once the outermost forward it ran in (the model's, or
a block's called on its own) has returned: the calls of a forward that raised (an expert out of memory after
routing, in any block) are not recorded, and a replayed forward that raised hands its calls to the retry. Leaving ``replay()`` normally with recorded calls unused, or asking for more calls than
were recorded, raises a RuntimeError naming the block.

Activation checkpointing: ``torch.utils.checkpoint`` (reentrant or not) with its default
``preserve_rng_state=True`` redraws the same noise in the recomputed forward, so it reproduces the routing
without a replay. A replay makes ``use_reentrant=True`` exact whatever the RNG (``preserve_rng_state=False``):
record the forward, run ``backward()`` inside ``replay()``. Under the non-reentrant checkpoint a replayed
recomputation is exact where it builds the recorded forward's graph and is refused (torch's CheckpointError,
from its saved-tensor check) where it does not: use that checkpoint without a replay. A recomputation that
torch stops early (non-reentrant) has used the calls it took. The calls are replayed in the order they are
recomputed, so a block called several times under separate checkpoints (recomputed in reverse during
backward) cannot be replayed that way.

Token choice only. Indices refer to the routed tokens: with ``token_mask``, the T rows that were kept, so
the replayed forward must use the same mask. Under expert parallelism each rank records and replays its own
tokens' picks (columns are global expert ids, rows are the rank's tokens): replay is local, no communication.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..checks import check_choice
from ..config import RoutingConfig
from .record import Routing
from .router import Router
from .select import Selection, combine_weights, from_picks, with_capacity

__all__ = ["Replayed", "RouterReplay", "replay_selection"]  # and the constant REPLAY_WEIGHTS; the rest serves route.py

REPLAY_WEIGHTS = ("recompute", "frozen")
DRAWN_NOISE = ("gumbel", "gaussian", "jitter")  # noise the router draws from the device's generator


@dataclass(frozen=True)
class Replayed:
    """One recorded call of one block.

    Attributes:
        indices: (T, k) long router columns, best first.
        weights: (T, k) the recorded combine weights (detached).
        mode: how to weight the replay, ``"recompute"`` / ``"frozen"``.
        scores: (T, E') the recorded scores (detached) that a token-choice capacity ranks the picks by, so a
            replay drops exactly the slots the recorded forward dropped; None: rank by the current scores.
        rng_state: the device generator's state just before the router drew its noise (uint8, as
            ``torch.get_rng_state()`` / ``torch.cuda.get_rng_state()`` give it); None when it drew none.
        rng_device: the device type that state belongs to (``"cpu"``, ``"cuda"``, ...).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    mode: str = "recompute"
    scores: Optional[torch.Tensor] = None
    rng_state: Optional[torch.Tensor] = None
    rng_device: Optional[str] = None


def check_call(replayed: Replayed, num_tokens: int, config: RoutingConfig,
               num_columns: Optional[int] = None) -> None:
    """Refuse a recorded call whose picks do not fit this forward's T routed tokens and k, or that was recorded
    over another number of router columns (a block resized since, e.g. by :mod:`moefy.compress`: its column j
    is another expert now)."""
    check_columns(replayed, num_columns)
    idx = replayed.indices
    if idx.dim() != 2 or idx.shape[0] != num_tokens:
        raise ValueError(f"router replay: indices were recorded with shape {tuple(idx.shape)} but this forward "
                         f"routes T={num_tokens} tokens; indices must have shape (T, k) for the same routed "
                         "tokens (same input, same token_mask)")
    if idx.shape[1] != config.k:
        raise ValueError(f"router replay: indices pick k={idx.shape[1]} columns per token but the block has "
                         f"k={config.k}")


def check_columns(replayed: Replayed, num_columns: Optional[int]) -> None:
    """Refuse a call recorded over other than ``num_columns`` router columns (None: not checked)."""
    recorded = replayed.scores.shape[-1] if replayed.scores is not None else None
    if num_columns is not None and recorded is not None and recorded != num_columns:
        raise ValueError(f"router replay: the call was recorded over {recorded} router columns, the block now has "
                         f"{num_columns} (resized since, e.g. by moefy.compress); record again after resizing")


def replay_selection(probs: torch.Tensor, replayed: Replayed, config: RoutingConfig, num_experts: int,
                     subset: Optional[torch.Tensor] = None) -> Selection:
    """The recorded picks as this forward's selection; ``probs`` (T, E') are the current router's scores,
    ``subset`` (T, E') the SIMPLE estimator at the recorded picks (:func:`replayed_subset`) or None."""
    num_tokens, num_columns = probs.shape
    check_call(replayed, num_tokens, config, num_columns)
    idx = replayed.indices.to(probs.device)
    if replayed.mode == "frozen":
        vals = replayed.weights.to(probs.device, probs.dtype)                   # (T, k) constants
    else:  # as token_choice weights its picks: the scores, times the sampler's estimator if there is one
        vals = probs.gather(-1, idx)                                            # (T, k)
        if subset is not None:
            vals = vals * subset.gather(-1, idx).to(probs.dtype)
        vals = combine_weights(vals, config)
    picked = from_picks(idx, vals, num_columns, num_experts, config.zero_columns)
    ranked_by = replayed.scores.to(probs.device) if replayed.scores is not None else probs
    return with_capacity(picked, ranked_by, config, num_experts)  # the recorded drops, by the recorded scores


def replayed_sample(replayed: Replayed, num_columns: int, device: torch.device) -> torch.Tensor:
    """The recorded picks as a sampler's k-hot subset: (T, num_columns) bool, True at ``indices``."""
    idx = replayed.indices.to(device)
    return torch.zeros(idx.shape[0], num_columns, dtype=torch.bool, device=device).scatter_(1, idx, True)


def noise_state(router: Router, device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(the generator state, the device type) the router's noise will be drawn from; (None, None) when it
    draws no noise (eval, no noise, or ``"simple"``, whose sample is the picks)."""
    if not (router.training and router.noise in DRAWN_NOISE):
        return None, None
    if device.type == "cpu":
        return torch.get_rng_state(), "cpu"
    return getattr(torch, device.type).get_rng_state(device), device.type


@contextlib.contextmanager
def redrawn_noise(replayed: Optional[Replayed], device: torch.device) -> Iterator[None]:
    """Inside, the device's generator is in the state ``replayed`` recorded (so the router draws the recorded
    noise); outside, it is as it was. Nothing happens without a recorded state."""
    if replayed is None or replayed.rng_state is None:
        yield
        return
    if replayed.rng_device != device.type:
        raise ValueError(f"router replay: the noise was recorded on a {replayed.rng_device} device and this forward "
                         f"routes on {device.type}; replay on the device type the forward was recorded on")
    get, put = ((torch.get_rng_state, torch.set_rng_state) if device.type == "cpu" else
                (lambda: getattr(torch, device.type).get_rng_state(device),
                 lambda state: getattr(torch, device.type).set_rng_state(state, device)))
    saved = get()
    put(replayed.rng_state)
    try:
        yield
    finally:
        put(saved)


class ReplaySlot:
    """What a block's routing consults while a :class:`RouterReplay` records or replays it (``block.router_replay``).

    :func:`~moefy.routing.route.route` calls ``take()`` before routing (the next recorded call while replaying,
    None while recording) and ``keep(routing, rng_state, rng_device)`` after. Calls made inside a forward of
    the model or of a block are pending until the outermost such forward returns (``commit``) and are
    dropped if it raised (``restore``); calls made outside any forward (``route_rows``) count at once.
    """

    def __init__(self, calls: List[Replayed], mode: Optional[str], label: str, in_forward: Callable[[], bool]):
        self.calls, self.mode, self.label = calls, mode, label
        self.pending: List[Replayed] = []  # recording: routed by forwards that have not returned yet
        self.next = 0                      # replaying: the next call to hand out
        self.used = 0                      # replaying: calls taken by forwards that returned
        self._in_forward = in_forward

    def take(self) -> Optional[Replayed]:
        if self.mode is None:
            return None
        if self.next >= len(self.calls):
            raise RuntimeError(f"router replay: {self.label} recorded {len(self.calls)} call(s) and this is call "
                               f"{self.next + 1}; record the same forwards you replay")
        call = self.calls[self.next]
        self.next += 1
        if not self._in_forward():
            self.used = self.next
        return dataclasses.replace(call, mode=self.mode)

    def keep(self, routing: Routing, rng_state: Optional[torch.Tensor] = None,
             rng_device: Optional[str] = None) -> None:
        if self.mode is None:
            self.pending.append(Replayed(routing.indices.detach(), routing.weights.detach(),
                                         scores=routing.probs.detach(), rng_state=rng_state, rng_device=rng_device))
            if not self._in_forward():
                self.commit()

    def mark(self) -> Tuple[int, int]:
        return len(self.pending), self.next

    def restore(self, mark: Tuple[int, int]) -> None:
        """Forget what happened since ``mark`` (a forward that raised)."""
        del self.pending[mark[0]:]
        self.next = mark[1]

    def commit(self) -> None:
        self.calls.extend(self.pending)
        self.pending.clear()
        self.used = self.next

    def rollback(self) -> None:
        """Forget whatever a forward that never returned left behind."""
        self.pending.clear()
        self.next = self.used


def _recomputation_stopped() -> bool:
    """Whether the exception being handled is the non-reentrant checkpoint ending its recomputation once it has
    what backward needs (torch raises it inside the forward): while replaying, the calls that forward took
    were used; while recording, it is no forward of the user's (torch recomputes when an ``autograd.grad``
    inside the checkpointed forward, SIMPLE's marginals, reads a saved tensor), so its calls are dropped."""
    return type(sys.exc_info()[1]).__name__ == "_StopRecomputationError"


def is_replayable(module: nn.Module) -> bool:
    """A block a :class:`RouterReplay` can drive: it has a moefy :class:`Router` at ``.router`` and routes
    through :func:`~moefy.routing.route.route` with its ``router_replay`` slot (every MoEBlock)."""
    return isinstance(getattr(module, "router", None), Router) and hasattr(module, "router_replay")


class RouterReplay:
    """Records and replays the routing of every block of ``model`` (see the module docstring).

    Attributes:
        records: module name → the list of that block's recorded calls (:class:`Replayed`), in call order.
    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no MoEBlock in ``model``, or one routes by expert choice.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.blocks = {name or ".": m for name, m in model.named_modules() if is_replayable(m)}
        if not self.blocks:
            raise ValueError(f"model contains no MoEBlock to record ({type(model).__name__})")
        for name, block in self.blocks.items():
            if getattr(block, "expert_choice", False):
                raise ValueError(f"router replay supports token choice only; {self._label(name)} uses "
                                 "expert choice, whose picks depend on the whole batch")
        self.records: Dict[str, List[Replayed]] = {name: [] for name in self.blocks}
        # a call commits when the outermost running forward (of the model or of a block) returns
        self.model = model
        self._open: List[List] = []  # per running forward: [returned?, each slot's mark at its start]

    def _label(self, name: str) -> str:
        block = self.blocks[name]
        return f"block '{name}' ({getattr(block, 'moe_name', type(block).__name__)})"

    @contextlib.contextmanager
    def record(self) -> Iterator["RouterReplay"]:
        """Inside, every call of every block appends its picks to ``records`` (earlier records are cleared)
        once the block's forward returns."""
        self.records = {name: [] for name in self.blocks}
        with self._slots(None):
            yield self

    @contextlib.contextmanager
    def replay(self, weights: str = "recompute") -> Iterator["RouterReplay"]:
        """Inside, every block takes its recorded picks in order instead of selecting.

        ``weights``: ``"recompute"`` (current router scores at the recorded columns, gradient to the router)
        or ``"frozen"`` (the recorded weights).

        Raises:
            RuntimeError: on leaving normally, a block used fewer calls than it recorded (an exception leaving
                the ``with`` propagates unchanged instead).
        """
        check_choice(weights, "weights", REPLAY_WEIGHTS)
        if not any(self.records.values()):
            raise RuntimeError("router replay: nothing recorded yet; run the forward inside record() first")
        with self._slots(weights) as slots:
            yield self
            unused = [f"{self._label(name)} used {slot.used} of its {len(slot.calls)} recorded call(s)"
                      for name, slot in slots.items() if slot.used != len(slot.calls)]
            if unused:
                raise RuntimeError("router replay: leaving replay() with recorded calls unused: " + "; ".join(unused)
                                   + ". Replay every forward you recorded (with activation checkpointing, run "
                                   "backward() inside replay() so every checkpointed block recomputes), or record "
                                   "only what you replay")

    @contextlib.contextmanager
    def _slots(self, mode: Optional[str]) -> Iterator[Dict[str, ReplaySlot]]:
        for block in self.blocks.values():
            if block.router_replay is not None:
                raise RuntimeError(f"{getattr(block, 'moe_name', type(block).__name__)} is already recording or "
                                   "replaying")
        self._open = []
        slots = {name: ReplaySlot(self.records[name], mode, self._label(name), lambda: bool(self._open))
                 for name in self.blocks}
        handles = []
        try:
            for name, block in self.blocks.items():
                block.router_replay = slots[name]
            modules = {id(m): m for m in (self.model, *self.blocks.values())}.values()
            for module in modules:  # transactions: a forward's calls count once it returned
                handles.append(module.register_forward_pre_hook(lambda *_: self._enter(slots)))
                handles.append(module.register_forward_hook(lambda *_: self._returned()))
                handles.append(module.register_forward_hook(lambda *_: self._leave(slots), always_call=True))
            yield slots
        finally:
            for handle in handles:
                handle.remove()
            for block in self.blocks.values():
                block.router_replay = None

    def _enter(self, slots: Dict[str, ReplaySlot]) -> None:
        if not self._open:  # an outermost forward starts: drop what one that never returned left behind
            for slot in slots.values():
                slot.rollback()
        self._open.append([False, [slot.mark() for slot in slots.values()]])

    def _returned(self) -> None:
        """Runs only when the forward returned (torch skips plain forward hooks when it raised)."""
        if self._open:
            self._open[-1][0] = True

    def _leave(self, slots: Dict[str, ReplaySlot]) -> None:
        """Runs whether the forward returned or raised (``always_call``), after :meth:`_returned`."""
        if not self._open:
            return
        returned, marks = self._open.pop()
        replaying = next(iter(slots.values())).mode is not None
        if not returned and not (replaying and _recomputation_stopped()):  # it raised: drop the calls it made
            for slot, mark in zip(slots.values(), marks):
                slot.restore(mark)
        if not self._open:
            for slot in slots.values():
                slot.commit()
