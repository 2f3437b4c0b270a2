"""The expert-execution seam: "run these rows, grouped by expert, through their experts".

Every implementation is called as ``experts(rows, token_index, routing, run_expert)`` with

- ``rows`` (A, *F): the assigned rows, grouped by expert (``routing.expert_index[:A]`` order);
- ``token_index`` (A,): the token each row came from (to slice per-token side inputs);
- ``routing``: the record (its counts tell where each expert's slice starts);
- ``run_expert(e, x_e, token_ids_e) -> (n_e, *F_out)``: how one expert runs on its rows (the block's
  ``expert_forward`` with the call's side inputs),

and returns (A, *F_out), row i the output of row i's expert. Experts that get no rows still take part in
backward with zero gradients (not None: DDP requires every parameter to be used).

- :class:`LoopedExperts`: one ``run_expert`` call per expert with rows, on its contiguous slice.
- :class:`FusedExperts`: identical Linear / MLP experts as one pass per layer (:mod:`moefy.dispatch.fused`);
  looped while something wraps an expert (PEFT, hooks, a parametrization), so the wrapper takes effect.
- :class:`moefy.parallel.ExpertParallelExperts`: the experts sharded over ranks, rows exchanged all-to-all.
"""
from __future__ import annotations

import logging
from itertools import repeat
from operator import contains, eq
from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..routing.record import Routing
from ..wrappers import HOOK_DICTS, global_hooks, own_hooks
from .fused import Layout, fused_experts_forward, fused_layout, runs_grouped

logger = logging.getLogger(__name__)

RunExpert = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def check_expert_output(out, expert_id: int, rows: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` if it is one tensor with ``rows`` rows (and ``like``'s trailing shape), else a clear error."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"expert_forward of expert {expert_id} returned {type(out).__name__}; it must return one tensor "
            f"with the expert's tokens on dim 0 (override expert_forward to pick the tensor out)")
    if out.dim() == 0 or out.shape[0] != rows or (like is not None and out.shape[1:] != like.shape[1:]):
        want = f"({rows}, ...)" if like is None else str((rows, *like.shape[1:]))
        raise ValueError(
            f"expert_forward of expert {expert_id} returned shape {tuple(out.shape)}, expected {want}: "
            f"one output row per input token, the same trailing shape for every expert")
    return out


def zero_grad_path(y: torch.Tensor, experts: Sequence[nn.Module], idle: Iterable[int]) -> torch.Tensor:
    """``y`` plus ``0 * sum(params)`` of the ``idle`` experts: unchanged values, but their parameters get zero
    gradients instead of None."""
    if not torch.is_grad_enabled():
        return y
    params = [p for e in idle for p in experts[e].parameters() if p.requires_grad]
    if not params:
        return y
    return y + torch.stack([p.sum() for p in params]).sum().to(y.dtype) * 0


def run_slices(rows: torch.Tensor, token_index: torch.Tensor, counts: Sequence[int], run_expert: RunExpert,
               expert_ids: Sequence[int], experts: Sequence[nn.Module]) -> torch.Tensor:
    """``rows`` (A, *F) cut into ``counts[j]`` rows for expert ``expert_ids[j]``, each slice through
    ``run_expert``; outputs concatenated in order: (A, *F_out). With no rows at all, one empty call to learn
    the output shape."""
    if rows.shape[0] == 0:
        e = expert_ids[0]
        empty = check_expert_output(run_expert(e, rows, token_index), e, 0)
        return zero_grad_path(empty, experts, range(len(experts)))
    outs = []
    for e, x_e, ids_e, n in zip(expert_ids, rows.split_with_sizes(counts), token_index.split_with_sizes(counts),
                                counts):
        if n:
            outs.append(check_expert_output(run_expert(e, x_e, ids_e), e, n, outs[0] if outs else None))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if 0 in counts:
        out = zero_grad_path(out, experts, [j for j, n in enumerate(counts) if n == 0])
    return out


class LoopedExperts:
    """One ``run_expert`` call per expert that received rows, on its contiguous slice."""

    def __init__(self, experts: Sequence[nn.Module]):
        self.experts = experts

    def __call__(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing,
                 run_expert: RunExpert) -> torch.Tensor:
        counts = routing.counts[:routing.num_experts]
        return run_slices(rows, token_index, counts, run_expert, range(len(counts)), self.experts)


class FusedExperts:
    """Identical Linear / ``Sequential(Linear, act, ..., Linear)`` / SwiGLU experts, one pass per layer over all
    rows (``run_expert`` is only used for a call with no rows). Needs 2-D rows: (A, D).

    The fused pass reads the experts' weights instead of calling their modules, which equals calling them only
    while nothing wraps them. So every call first checks that the experts are still the modules
    :func:`~moefy.dispatch.fused.fused_layout` vetted: none replaced (PEFT replaces a LoRA-targeted Linear by its
    own layer; a user may replace an expert: then they are vetted again), none of another class (a
    parametrization changes it), no hooks and no replaced ``forward`` on any of them. Where that fails, the call
    runs looped, one ``run_expert`` call per expert, so the wrappers run and train, and one warning says why.
    The check is a few C loops over the experts' modules, nothing per row: 0.2-1 % of a CPU forward of 64
    SwiGLU experts (about 50 µs on 2 busy cores). It reads every module's dicts, and in a model those are out of
    cache: a few thousand cache misses, about 60 µs per layer when decoding one token. So when only a few experts
    received rows (decoding), it checks those experts only (an idle expert's wrapper takes effect when it runs),
    and it reads the hook dicts only after a hook was registered somewhere since the last check that found none
    (torch numbers every registration: ``RemovableHandle.next_id``).
    """

    def __init__(self, experts: Sequence[nn.Module], layout: Layout):
        self.experts, self.layout = experts, layout
        self._looped = LoopedExperts(experts)
        self._vet()
        self._fused_types = set(self._types)  # for the warning: the classes that fused

    def _vet(self) -> None:
        """Keep what the fused pass relies on, as lists that :meth:`fusable` compares in C loops: the modules and
        their classes (a parametrization changes one), the ``_modules`` dict of the expert list and of every
        container with a copy (a replaced child), every hook dict and every instance ``__dict__`` (a replaced
        ``forward``); and the same per expert, for a call that runs a few."""
        self._modules = expert_modules(self.experts)
        self._types = list(map(type, self._modules))
        holders = [m for m in self._modules if m._modules] + ([self.experts] if isinstance(self.experts, nn.Module)
                                                              else [])
        self._children = [m._modules for m in holders]
        self._children_then = [dict(d) for d in self._children]
        self._attrs = [m.__dict__ for m in self._modules]
        self._hooks = [d[name] for d in self._attrs for name in HOOK_DICTS if name in d]
        listed = self.experts._modules if isinstance(self.experts, nn.Module) else None
        self._per_expert = [_ExpertSnapshot(listed, key, expert) for key, expert in
                            zip(listed or range(len(self.experts)), self.experts)]
        self._no_hooks_at = None  # RemovableHandle.next_id when the hook dicts were last found empty
        self._warned = False

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy`` / ``pickle`` of the block) vets its own experts again on its first call: the
        dicts kept here would be the originals' or stale copies."""
        snapshot = ("_types", "_children", "_children_then", "_attrs", "_hooks", "_per_expert")
        return {**{k: v for k, v in self.__dict__.items() if k not in snapshot}, "_modules": None}

    def __call__(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing,
                 run_expert: RunExpert) -> torch.Tensor:
        if rows.shape[0] == 0:
            return run_slices(rows, token_index, (), run_expert, [0], self.experts)
        # grouped mm finds each expert's rows on the device: no host counts, so no synchronisation, and idle
        # experts get zero gradients through the stacked weights
        grouped = runs_grouped(self.experts, self.layout, rows)
        counts = None if grouped else routing.counts[:routing.num_experts]
        few = counts is not None and 4 * (len(counts) - counts.count(0)) <= len(counts)  # decoding: check those
        if not self.fusable(rows.device.type, [e for e, n in enumerate(counts) if n] if few else None):
            return self._looped(rows, token_index, routing, run_expert)
        out = fused_experts_forward(self.experts, self.layout, rows, counts, routing.expert_index)
        if counts is not None and torch.is_grad_enabled() and 0 in counts:
            out = zero_grad_path(out, self.experts, [e for e, n in enumerate(counts) if n == 0])
        return out

    def fusable(self, device_type: str = "cpu", experts: Optional[Sequence[int]] = None) -> bool:
        """Whether the fused pass computes what calling the experts would (see the class docstring); logs one
        warning when it starts not to. ``experts``: the ids of the experts about to run, to check those only
        (None: all)."""
        if self._modules is None:  # a copy: same layout, its own modules
            self._vet()
        if experts is None:
            state = self._state()
        else:  # "replaced" wins over "forward", which wins over "vetted"
            state = "vetted"
            for e in experts:
                found = self._per_expert[e].state()
                if found == "replaced":
                    state = found
                    break
                if found == "forward":
                    state = found
        if state == "replaced":
            with torch.autocast(device_type, enabled=False):  # replaced or re-classed: vet again (in full precision)
                self.layout = fused_layout(list(self.experts))
            self._vet()
            state = self._state()
        if self.layout is not None and state == "vetted" and not global_hooks() and not self._hooked():
            return True
        if not self._warned:
            self._warned = True
            name = next((e.__dict__["mixture_id"] for e in self.experts if "mixture_id" in e.__dict__), "a mixture")
            logger.warning("%s, fused=True: %s; it runs its experts one module call each (looped) until that "
                           "changes, so the wrapper takes effect", name, self._why_not())
        return False

    def _state(self) -> str:
        """``"replaced"`` (a module replaced or of another class), ``"forward"`` (a ``forward`` replaced on an
        instance) or ``"vetted"``, over all experts."""
        if not all(map(eq, self._children, self._children_then)) or list(map(type, self._modules)) != self._types:
            return "replaced"
        return "forward" if any(map(contains, self._attrs, repeat("forward"))) else "vetted"

    def _hooked(self) -> bool:
        """Whether any expert module has a hook of its own. Every registration makes a ``RemovableHandle``, which
        numbers them globally: while that number is the one of the last check that found none, none was added."""
        registered = RemovableHandle.next_id
        if registered == self._no_hooks_at:
            return False
        if any(self._hooks):
            return True
        self._no_hooks_at = registered
        return False

    def _why_not(self) -> str:
        if global_hooks():
            return "a global module hook is set (torch.nn.modules.module.register_module_forward_hook, ...)"
        for e, expert in enumerate(self.experts):
            for name, m in (("", expert), *(("." + n, c) for n, c in expert.named_children())):
                cls = type(m)
                if own_hooks(m):
                    return f"experts[{e}]{name} has hooks or a replaced forward, which the fused pass would skip"
                if cls not in self._fused_types:
                    return (f"experts[{e}]{name} is now a {cls.__module__}.{cls.__qualname__} (a PEFT / LoRA layer, "
                            f"a parametrization, another module), which the fused pass cannot read")
        return "the experts are no longer identical plain Linear / Sequential / SwiGLU modules"


class _ExpertSnapshot:
    """One expert as vetted, for :meth:`FusedExperts.fusable` on a few experts: where the expert list holds it,
    its ``_modules`` and a copy, its modules with their classes and instance dicts (few objects: each read is a
    cache miss in a decoding step)."""

    __slots__ = ("listed", "key", "expert", "children", "children_then", "modules", "types", "attrs")

    def __init__(self, listed: Optional[dict], key, expert: nn.Module):
        self.listed, self.key, self.expert = listed, key, expert
        self.children, self.children_then = expert._modules, dict(expert._modules)
        self.modules = (expert, *expert._modules.values())
        self.types = tuple(map(type, self.modules))
        self.attrs = tuple(m.__dict__ for m in self.modules)

    def state(self) -> str:
        if (self.listed is not None and self.listed.get(self.key) is not self.expert) or \
                self.children != self.children_then or tuple(map(type, self.modules)) != self.types:
            return "replaced"
        return "forward" if any(map(contains, self.attrs, repeat("forward"))) else "vetted"


def expert_modules(experts: Sequence[nn.Module]) -> List[nn.Module]:
    """Each expert, then its children: every module a fused pass reads (fused experts are at most two deep)."""
    modules: List[nn.Module] = []
    for expert in experts:
        modules.append(expert)
        modules.extend(expert._modules.values())
    return modules
