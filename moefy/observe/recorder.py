"""Routing statistics over many batches: a recorder that hooks every MoEBlock of a model, or every MoE layer of a
Hugging Face model as transformers ships it (:mod:`moefy.observe.hf_routing`: hooks only, outputs unchanged).

Per layer it accumulates the load per router column (and per token position), the router entropy, the
dropped token slots and, when labels are given, the class × column affinity matrix and routing accuracy; and the
routing health (:mod:`moefy.observe.health`): MaxVio per recorded batch, the experts' co-activation and the
top-1 transitions to the next MoE layer, with an optional collapse alarm.

    rec = RoutingRecorder(model)
    with rec:                      # hooks live inside the with block
        for x, y in loader:
            rec.labels = y         # (B,) or per-token labels of the batch about to run; None for no labels
            model(x)
    rec.stats["blocks.0.mlp"].utilization, rec.stats["blocks.0.mlp"].routing_acc
    rec.health()["blocks.0.mlp"].max_vio                 # LayerHealth of each layer over the recorded batches
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_int, check_module, check_tensor
from ..routing.record import Routing
from .health import HealthAlarm, HealthThresholds, LayerHealth, max_vio, model_health
from .hf_routing import HFMoELayer, hf_moe_layers

Observed = Union[MoEBlock, HFMoELayer]
logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Accumulated routing statistics of one MoEBlock (or observed Hugging Face MoE layer). E' = router columns
    (the hole, if any, is last).

    Attributes:
        name: the block's module name in the model (``""`` for the model itself).
        layer_id: the block's ``layer_id`` (a Hugging Face layer's decoder layer index).
        num_experts, hole: the block's E and whether its last column is a hole.
        null_columns: the kinds of its null-expert columns E, E+1, ... (``config.null_columns``), before the hole.
        forwards: forwards recorded.
        tokens: tokens routed (samples, with per-sample routing); not the non-finite ones (routed nowhere).
        slots: token slots: ``tokens · k`` for token choice, ``tokens`` for expert choice.
        load: (E',) float64 assignments per router column.
        position_load: (E', N) float64 assignments per column and token position (as
            :meth:`MoEBlock.experts_load`), or None once two forwards disagreed on N.
        entropy_sum: sum over tokens of the entropy (nats) of the router scores of each token.
        dropped: token slots sent to the hole, a zero null expert or over an expert's capacity (token choice),
            or tokens no real expert picked (expert choice). ``load`` counts only kept assignments (the null
            experts' and the hole's included).
        null_slots: token slots sent to copy or constant null experts (computed, not dropped).
        affinity: (C, E') float64 assignments of tokens of class c to column e, or None without labels.
        batch_max_vio: the MaxVio of each recorded forward's own expert load (None where no expert got a token);
            see :mod:`moefy.observe.health`.
        coactivation: (E, E) float64, real experts only: ``[i, j]`` = tokens processed by both expert i and
            expert j (i ≠ j); ``[e, e]`` = tokens expert e processed (``load[e]``). From the kept assignments
            (a slot dropped over a capacity is in none).
        multi_expert: whether a token could reach two experts (token choice with k ≥ 2, or expert choice): only
            then does ``coactivation`` hold more than its diagonal.
        transition_to: the MoE layer that ran next in the same forward of the recorded model (the first one
            seen; None until then).
        transition: (E', E'_next) float64: ``[i, j]`` = tokens whose top-1 router column was i in this layer and
            j in ``transition_to`` in the same forward of the model; None until one was paired. A token's
            top-1 is the column of its kept assignment with the largest combine weight (ties: the lowest
            column); tokens masked out, non-finite or with no kept assignment in either layer are in no cell.
        transition_refused: why a forward of this layer was not paired with the next layer's (their routed
            token shapes differ, e.g. per-token vs per-sample routing; another layer followed it; it ran outside
            a forward of the recorded model), or None.
    """

    name: str
    layer_id: Optional[int]
    num_experts: int
    hole: bool
    forwards: int = 0
    tokens: int = 0
    slots: int = 0
    load: torch.Tensor = None
    position_load: Optional[torch.Tensor] = None
    entropy_sum: float = 0.0
    dropped: int = 0
    affinity: Optional[torch.Tensor] = None
    null_columns: Tuple[str, ...] = ()
    null_slots: int = 0
    batch_max_vio: List[Optional[float]] = field(default_factory=list, repr=False)
    coactivation: Optional[torch.Tensor] = field(default=None, repr=False)
    multi_expert: bool = False
    transition_to: Optional[str] = None
    transition: Optional[torch.Tensor] = field(default=None, repr=False)
    transition_refused: Optional[str] = None
    _positions_consistent: bool = field(default=True, repr=False)

    @property
    def num_columns(self) -> int:
        return self.num_experts + len(self.null_columns) + int(self.hole)

    @property
    def utilization(self) -> List[float]:
        """E' fractions of all assignments that went to each router column (sums to 1)."""
        total = float(self.load.sum())
        return [float(v) / total if total else 0.0 for v in self.load]

    @property
    def entropy(self) -> float:
        """Mean per-token router entropy in nats (0 = certain, log E' = uniform)."""
        return self.entropy_sum / self.tokens if self.tokens else float("nan")

    @property
    def dropped_frac(self) -> float:
        """Fraction of token slots dropped (see ``dropped``)."""
        return self.dropped / self.slots if self.slots else 0.0

    @property
    def expert_load(self) -> torch.Tensor:
        """(E,) float64 assignments of the real experts (the null columns and the hole left out)."""
        return self.load[: self.num_experts]

    @property
    def health(self) -> LayerHealth:
        """MaxVio, dead experts, load CV, load and token entropies over the recorded forwards
        (:class:`~moefy.observe.health.LayerHealth`)."""
        return LayerHealth.of(self.expert_load, self.batch_max_vio, self.entropy if self.tokens else None)

    @property
    def routing_acc(self) -> Optional[float]:
        """Σ_c max_e affinity[c, e] / Σ affinity: the fraction of assignments that went to the most
        frequent column of their class (1 = every class has its own expert; 1/E' or so = no preference).
        None without labels."""
        if self.affinity is None or float(self.affinity.sum()) == 0:
            return None
        return float(self.affinity.max(dim=1).values.sum() / self.affinity.sum())


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` (T, E') router scores → (T,) entropy in nats of each row normalised to sum to one
    (sigmoid scores are normalised first; softmax rows are unchanged)."""
    check_tensor(probs, "probs")
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (T, E'), got {tuple(probs.shape)}")
    p = probs.detach().double()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return -(p * p.clamp_min(1e-300).log()).sum(dim=-1)


def labels_per_token(labels: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Expand ``labels`` to one label per routed token: (T,) long.

    ``labels`` may be (B,) (one per sample; every token of sample b gets labels[b]; B = tokens_shape[0]) or
    have the routing's ``tokens_shape`` (one per token).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing record, got {type(routing).__name__}")
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"labels must be integer class ids (a tensor, array or list), got {labels!r:.60}") from None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    shape, t = tuple(routing.tokens_shape), routing.num_inputs
    if tuple(labels.shape) == shape or (labels.dim() == 1 and labels.numel() == t):
        return labels.reshape(-1).long()
    if labels.dim() == 1 and labels.numel() == shape[0]:
        return labels.long().repeat_interleave(t // shape[0])
    raise ValueError(f"labels must have shape (B,) with B={shape[0]} or the routed tokens' shape {shape}, "
                     f"got {tuple(labels.shape)}")


class RoutingRecorder:
    """Collects :class:`LayerStats` for every MoEBlock of ``model`` across forwards, and for every MoE layer of a
    Hugging Face model that was not converted (:class:`~moefy.observe.hf_routing.HFMoELayer`: the experts module's
    inputs and the router's logits, read by hooks; the model's outputs are unchanged).

    Use as a context manager (hooks are removed on exit) or call :meth:`attach` / :meth:`detach`.
    Set :attr:`labels` before a forward to record the class × expert affinity of that batch; the labels stay
    until changed. Set :attr:`enabled` to False to skip forwards (e.g. evaluation batches).

    Routing health (:mod:`moefy.observe.health`): :meth:`health` gives each layer's MaxVio, dead experts, load
    CV and entropies over the forwards recorded since the last :meth:`reset` (the *global batch*; reset at each
    optimizer step to measure per step, at each epoch for the epoch); :attr:`LayerStats.batch_max_vio` the
    MaxVio of every recorded forward; :attr:`LayerStats.coactivation` and :attr:`LayerStats.transition` the
    expert co-activation and the top-1 transitions from each layer to the MoE layer that runs next in the same
    forward of ``model`` (token by token, when both route inputs of the same leading shape; otherwise refused
    with a logged warning and :attr:`LayerStats.transition_refused`; blocks called outside a forward of
    ``model``, or recomputed in backward, are not paired).

    Args:
        model: any module containing MoEBlocks (or one MoEBlock), or a transformers MoE model.
        num_classes: C, rows of the affinity matrix; grown on demand when None.
        alarm: bounds of a healthy layer (:class:`~moefy.observe.health.HealthThresholds`); each recorded forward
            of a layer is checked against them and a crossing is logged as a warning on
            ``logging.getLogger("moefy.observe.health")`` and kept in :attr:`crossings`. None: no alarm.

    Attributes:
        blocks: name → the MoEBlock or :class:`~moefy.observe.hf_routing.HFMoELayer` recorded.
        skipped: ``"name: why"`` for each Hugging Face experts module whose routing cannot be read (also logged).
        crossings: every :class:`~moefy.observe.health.Crossing` the alarm logged (kept across resets).
    """

    def __init__(self, model: nn.Module, num_classes: Optional[int] = None,
                 alarm: Optional[HealthThresholds] = None):
        check_module(model, "model")
        self._alarm = None if alarm is None else HealthAlarm(alarm)
        self._root = model
        self._forward, self._depth = 0, 0  # forwards of the model begun; nested calls of it now running
        self._refusals_logged: set = set()  # layer pairs not paired, warned about once
        moe = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]
        hf, self.skipped = hf_moe_layers(model, exclude=[m for _, m in moe])
        self.blocks: Dict[str, Observed] = dict(moe + [(layer.name, layer) for layer in hf])
        if not self.blocks:
            raise ValueError("model contains no MoEBlock and no Hugging Face MoE layer (an experts module called as "
                             "experts(hidden_states, top_k_index, top_k_weights)): nothing to record"
                             + (f"; found but not readable: {self.skipped}" if self.skipped else ""))
        self.num_classes = check_int(num_classes, "num_classes", min=1, optional=True)
        self.labels: Optional[torch.Tensor] = None
        self.enabled = True
        self._handles: list = []
        self.reset()

    @property
    def crossings(self) -> list:
        return [] if self._alarm is None else self._alarm.crossings

    def reset(self) -> None:
        """Forget everything recorded (e.g. at the start of an epoch or of an optimizer step: the next global
        batch). Hooks stay attached; the alarm remembers which bounds each layer was beyond."""
        self.stats: Dict[str, LayerStats] = {
            name: LayerStats(name=name, layer_id=b.layer_id, num_experts=b.num_experts, hole=b.hole,
                             null_columns=tuple(b.config.null_columns),
                             load=torch.zeros(b.num_columns, dtype=torch.float64),
                             coactivation=torch.zeros(b.num_experts, b.num_experts, dtype=torch.float64))
            for name, b in self.blocks.items()}
        # the last record in the current forward of the model: (forward, name, tokens shape, (N,) top-1 columns)
        self._last: Optional[Tuple[int, str, Tuple[int, ...], torch.Tensor]] = None

    def health(self) -> Dict[str, LayerHealth]:
        """name → :class:`~moefy.observe.health.LayerHealth` of each layer over the forwards recorded since the
        last reset (:func:`~moefy.observe.health.model_health` of it: the model's)."""
        return {name: s.health for name, s in self.stats.items()}

    def model_health(self) -> dict:
        """The health over all layers (:func:`~moefy.observe.health.model_health`): mean and max MaxVio, dead
        experts and their fraction of all experts, the worst layer."""
        return model_health(self.health())

    def attach(self) -> "RoutingRecorder":
        if not self._handles:
            self._handles = [b.register_forward_hook(self._hook(name)) if isinstance(b, MoEBlock)
                             else b.watch(self._watcher(name)) for name, b in self.blocks.items()]
            self._handles += [self._root.register_forward_pre_hook(self._begin_forward),
                              self._root.register_forward_hook(self._end_forward, always_call=True)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    __enter__ = attach

    def __exit__(self, *exc) -> None:
        self.detach()

    def _begin_forward(self, module, args) -> None:
        if not self._depth:
            self._forward, self._last = self._forward + 1, None
        self._depth += 1

    def _end_forward(self, module, args, output) -> None:
        self._depth = max(0, self._depth - 1)

    def _hook(self, name: str):
        def hook(block: MoEBlock, inputs, output) -> None:
            if self.enabled and block.routing is not None:
                self.record(name, block)
        return hook

    def _watcher(self, name: str):
        def watcher(layer: HFMoELayer) -> None:
            if self.enabled:
                self.record(name, layer)
        return watcher

    @torch.no_grad()
    def record(self, name: str, block: Observed) -> None:
        """Add the last routing of ``block`` (registered as ``name``) to the statistics."""
        if name not in self.stats:
            raise ValueError(f"name {name!r} is not a recorded block; recorded: {sorted(self.stats)}")
        if not isinstance(block, (MoEBlock, HFMoELayer)):
            raise TypeError(f"block must be a MoEBlock or an HFMoELayer, got {type(block).__name__}")
        if block.routing is None:
            raise ValueError(f"block {block.moe_name} has not run a forward yet: nothing to record")
        r, s = block.routing, self.stats[name]
        s.forwards += 1
        nonfinite = r.num_nonfinite  # tokens routed nowhere: their slots count as dropped, no entropy
        s.tokens += r.num_tokens - nonfinite
        s.slots += r.num_tokens * (1 if r.mode == "expert_choice" else r.indices.shape[1])
        s.load += torch.tensor(r.counts, dtype=torch.float64)
        s.entropy_sum += float(token_entropy(r.probs if not nonfinite else r.probs[r.finite]).sum())
        s.dropped += int(r.dropped)
        s.null_slots += r.null_slots
        batch_load = r.counts[: s.num_experts]  # counts read first: the lists then hold only kept assignments
        s.batch_max_vio.append(max_vio(batch_load))
        s.multi_expert |= r.mode == "expert_choice" or r.indices.shape[1] > 1
        s.coactivation += coactivation_counts(r.token_index, r.expert_index, s.num_experts, r.num_inputs)
        self._add_transition(name, s, r)
        if self._alarm is not None:
            self._alarm.check(name, batch_load, s.forwards)
        if s._positions_consistent:
            pos = block.experts_load().double().cpu()
            if s.position_load is None:
                s.position_load = pos
            elif s.position_load.shape == pos.shape:
                s.position_load += pos
            else:
                s.position_load, s._positions_consistent = None, False
        if self.labels is not None:
            self._add_affinity(s, r)

    def _add_transition(self, name: str, s: LayerStats, r: Routing) -> None:
        """Pair this record with the one before it in the same forward of the model: the previous layer's
        top-1 per token → this layer's."""
        if not self._depth:  # a block called on its own, or recomputed in backward: no forward to pair in
            s.transition_refused = "it ran outside a forward of the recorded model: nothing to pair it with"
            return
        last, top1 = self._last, top1_columns(r)
        self._last = (self._forward, name, tuple(r.tokens_shape), top1)
        if last is None or last[0] != self._forward or last[1] == name:
            return
        _, before, shape, source = last
        p = self.stats[before]
        p.transition_to = p.transition_to or name
        if p.transition_to != name:
            self._refuse(p, before, name, f"{before!r} was followed by {p.transition_to!r} and later by {name!r}: "
                                          f"transitions are kept to {p.transition_to!r} only")
        elif shape != tuple(r.tokens_shape):
            self._refuse(p, before, name, f"{before!r} routed inputs of leading shape {shape} and {name!r} of "
                                          f"{tuple(r.tokens_shape)}: their tokens cannot be paired")
        else:
            source = source.to(top1.device)
            both = (source >= 0) & (top1 >= 0)
            cells = torch.bincount(source[both] * s.num_columns + top1[both],
                                   minlength=p.num_columns * s.num_columns)
            counts = cells.view(p.num_columns, s.num_columns).double().cpu()
            p.transition = counts if p.transition is None else p.transition + counts

    def _refuse(self, p: LayerStats, before: str, name: str, why: str) -> None:
        p.transition_refused = why
        if (before, name) not in self._refusals_logged:
            self._refusals_logged.add((before, name))
            logger.warning("routing health: no top-1 transitions: %s", why)

    def _add_affinity(self, s: LayerStats, r: Routing) -> None:
        labels = labels_per_token(self.labels, r).to(r.token_index.device)
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        classes = int(labels.max()) + 1 if labels.numel() else 0
        if self.num_classes is not None and classes > self.num_classes:
            raise ValueError(f"labels must be < num_classes={self.num_classes}, got {classes - 1}")
        rows = max(self.num_classes or 0, classes, 0 if s.affinity is None else s.affinity.shape[0])
        if s.affinity is None or s.affinity.shape[0] < rows:
            grown = torch.zeros(rows, s.num_columns, dtype=torch.float64)
            if s.affinity is not None:
                grown[: s.affinity.shape[0]] = s.affinity
            s.affinity = grown
        flat = labels[r.token_index].cpu() * s.num_columns + r.expert_index.cpu()
        s.affinity += torch.bincount(flat, minlength=rows * s.num_columns).double().view(rows, s.num_columns)

    def summary(self, matrices: bool = True) -> List[dict]:
        """One dict per layer, JSON-ready: layer, utilization, entropy, routing_acc, dropped, affinity and the
        health fields (max_vio, max_vio_batch, dead, cv, load_entropy; with ``matrices``: coactivation and
        transition_to / transition)."""
        names = {name: s.name or "model" for name, s in self.stats.items()}
        return [layer_summary(s, matrices, names.get(s.transition_to)) for s in self.stats.values()]


def layer_summary(s: LayerStats, matrices: bool = True, transition_to: Optional[str] = None) -> dict:
    """The JSON fields of one layer (see :mod:`moefy.observe.log`). ``matrices``: also the co-activation
    (where a token can reach two experts) and the transition matrix (where one was recorded), written under the
    next layer's log name ``transition_to`` (default: ``s.transition_to``)."""
    if not isinstance(s, LayerStats):
        raise TypeError(f"s must be a LayerStats (RoutingRecorder.stats[name]), got {type(s).__name__}")
    out = {"layer": s.name or "model", "routing_acc": _round(s.routing_acc), "entropy": _round(s.entropy),
           "utilization": [_round(u) for u in s.utilization], "hole": s.hole, "dropped": _round(s.dropped_frac)}
    if s.null_columns:
        out["null_columns"] = list(s.null_columns)
    if s.affinity is not None:
        out["affinity"] = [[int(v) for v in row] for row in s.affinity.tolist()]
    if s.forwards:
        h = s.health
        out.update(max_vio=_round(h.max_vio), max_vio_batch=_round(h.max_vio_batch), dead=list(h.dead),
                   cv=_round(h.cv), load_entropy=_round(h.load_entropy))
        if matrices and s.multi_expert:
            out["coactivation"] = [[int(v) for v in row] for row in s.coactivation.tolist()]
        if matrices and s.transition is not None:
            out["transition_to"] = transition_to or s.transition_to
            out["transition"] = [[int(v) for v in row] for row in s.transition.tolist()]
    return out


@torch.no_grad()
def coactivation_counts(token_index: torch.Tensor, expert_index: torch.Tensor, num_experts: int,
                        num_inputs: Optional[int] = None) -> torch.Tensor:
    """(E, E) float64 on the host: ``[i, j]`` = tokens assigned to both expert i and expert j (i ≠ j), ``[e, e]``
    = tokens assigned to expert e, from the (A,) assignment lists of a :class:`Routing` record (token ids in
    ``[0, num_inputs)`` and router columns; columns ≥ E, the null experts and the hole, are left out)."""
    for value, name in ((token_index, "token_index"), (expert_index, "expert_index")):
        check_tensor(value, name)
        if value.dim() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor (A,), got {value.dtype} {tuple(value.shape)}")
    if token_index.shape != expert_index.shape:
        raise ValueError(f"token_index and expert_index must have the same shape (A,), got "
                         f"{tuple(token_index.shape)} and {tuple(expert_index.shape)}")
    check_int(num_experts, "num_experts", min=1)
    check_int(num_inputs, "num_inputs", min=1, optional=True)
    real = expert_index < num_experts
    tokens, experts = token_index[real], expert_index[real]
    if not tokens.numel():
        return torch.zeros(num_experts, num_experts, dtype=torch.float64)
    n = int(tokens.max()) + 1 if num_inputs is None else num_inputs
    if num_experts <= 64 and n < 1 << 24:  # membership (N, E) of 0/1: Mᵀ M is exact in float32 below 2**24
        member = torch.zeros(n, num_experts, device=tokens.device)
        member[tokens, experts] = 1.0
        return (member.T @ member).double().cpu()
    # many experts: count the slot pairs of each token, N·m² work (m: the most experts a token got)
    order = torch.argsort(tokens, stable=True)
    tokens, experts = tokens[order], experts[order]
    per_token = torch.bincount(tokens, minlength=n)
    slot = torch.arange(tokens.numel(), device=tokens.device) - (torch.cumsum(per_token, 0) - per_token)[tokens]
    table = torch.full((n, int(per_token.max())), -1, dtype=torch.long, device=tokens.device)  # (N, m), -1 pad
    table[tokens, slot] = experts
    counts = torch.zeros(num_experts * num_experts, dtype=torch.long, device=tokens.device)
    for part in table.split(max(1, (1 << 20) // table.shape[1] ** 2)):  # ~1M slot pairs at a time
        a, b = part.unsqueeze(2), part.unsqueeze(1)                      # (u, m, 1), (u, 1, m)
        counts += torch.bincount((a * num_experts + b)[(a >= 0) & (b >= 0)], minlength=num_experts ** 2)
    return counts.view(num_experts, num_experts).double().cpu()


@torch.no_grad()
def top1_columns(routing: Routing) -> torch.Tensor:
    """(``num_inputs``,) long: each input token's top-1 router column, the column of its kept assignment with
    the largest combine weight (ties: the lowest column); -1 for a token with none (masked out, non-finite,
    every slot dropped)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing record (block.routing), got {type(routing).__name__}")
    routing.counts  # read: the lists then hold only the counted assignments
    tokens, columns, weight = routing.token_index, routing.expert_index, routing.weight.float()
    n = routing.num_inputs
    best = torch.full((n,), -math.inf, device=weight.device).scatter_reduce(0, tokens, weight, "amax")
    top = weight == best[tokens]
    none = routing.logits.shape[1]
    out = torch.full((n,), none, dtype=torch.long, device=weight.device)
    out = out.scatter_reduce(0, tokens[top], columns[top], "amin")
    return out.masked_fill(out == none, -1)


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)
