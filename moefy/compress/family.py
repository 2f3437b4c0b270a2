"""Fewer experts in a family-routed block (:class:`~moefy.hf.generic.HFExpertsBlock`): the family's own router and
stacked experts, sliced, and checked against the family's router restricted to the kept experts.

A family-routed block keeps transformers' router module (GPT-OSS's, GLM-4.5's, ERNIE-4.5's, ...) and its stacked
experts module. Keeping experts ``ids`` means, in both modules and in the family's MoE block around them:

- every tensor with E rows (the router's ``weight``, ``bias``, ``e_score_correction_bias``, a per-expert scale;
  the experts' ``gate_up_proj``, ``down_proj``, their biases, a per-expert norm; the family block's own
  ``expert_bias``) keeps rows ``ids``, and a (1, E) tensor (ERNIE-4.5's statistics) keeps columns ``ids``;
- every expert count the modules keep as an attribute (``num_experts``, ``n_routed_experts``, ...) becomes E₂.

Family code is not moefy's, so the result is checked before the model is touched: on a copy of the family's MoE
block, 64 random tokens must give, to float rounding, the outputs of another copy whose router is restricted to
the kept experts (the removed experts' logits are -inf, and their additive selection biases too, so they are
never picked and their probability is 0). A family whose router computes anything else (a removed expert still
reachable, a group left with too few experts, a layout these rules miss) is refused by name.
"""
from __future__ import annotations

import copy
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..dispatch.experts import LoopedExperts
from ..hf.generic import ExpertSlot

__all__ = ["check_family_block", "check_family_keep", "check_restricted", "family_groups", "resize_family_block",
           "merge_family_rows", "set_expert_counts"]

COUNT_NAMES = ("num_experts", "n_routed_experts", "num_routed_experts", "num_local_experts", "moe_num_experts")
TOKENS = 64


def _router_weight(block) -> torch.Tensor:
    """The family router's (E, D) gate weight: its one floating parameter of that shape."""
    E, D = block.num_experts, block.input_dim
    found = [p for p in block._family_router.parameters() if p.shape == (E, D)]
    if len(found) != 1:
        raise ValueError(f"its router {type(block._family_router).__name__} has {len(found)} parameters of shape "
                         f"({E}, {D}); moefy slices a router with one (E, D) gate weight")
    return found[0]


def check_family_block(where: str, block) -> None:
    """ValueError naming ``where`` for a family-routed block moefy cannot resize."""
    if block.reader != "experts call" or block.config.null_columns:
        raise ValueError(f"{where}: {block.source} routes to null experts ({block.reader}) that its router adds after "
                         f"the real ones; prune / merge do not resize it")
    if block.math != "stacked":
        raise ValueError(f"{where}: {block.source}'s experts are called one by one (not stacked weights moefy can "
                         f"slice); prune / merge do not resize it")
    try:
        _router_weight(block)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def family_groups(block) -> int:
    """The number of expert groups the family's router picks in (DeepSeek-V3's ``n_group``; 1 without)."""
    router = block._family_router
    groups = getattr(router, "n_group", None) or getattr(router, "num_group", None) or 1
    return int(groups) if isinstance(groups, int) and groups > 0 else 1


def check_family_keep(block, keep: int) -> None:
    """ValueError unless the family's router can pick its k experts among ``keep`` (in its kept groups)."""
    groups = family_groups(block)
    kept_groups = getattr(block._family_router, "topk_group", None) or groups
    if groups > 1 and block.k > kept_groups * keep // groups:
        raise ValueError(f"k={block.k} must fit in the kept groups: k <= topk_group * E / n_group = {kept_groups} * "
                         f"{keep} / {groups}")


def _slice(module: nn.Module, E: int, ids: torch.Tensor, recurse: bool = True) -> None:
    """Rows ``ids`` of every tensor of ``module`` (and its submodules, with ``recurse``) with E rows; columns of a
    (1, E) one; parameters keep identity."""
    for owner in (module.modules() if recurse else [module]):
        for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            if t is None or t.dim() == 0:
                continue
            if t.shape[0] == E:
                new = t.index_select(0, ids.to(t.device))
            elif t.dim() == 2 and t.shape == (1, E):
                new = t.index_select(1, ids.to(t.device))
            else:
                continue
            if name in owner._parameters:
                t.data = new.contiguous()
            else:
                owner._buffers[name] = new.contiguous()


def set_expert_counts(module: nn.Module, E: int, E2: int, names: Sequence[str] = COUNT_NAMES) -> None:
    """Every expert-count attribute (``names``) of ``module`` and its submodules that holds E becomes E2."""
    for m in module.modules():
        for name in names:
            value = m.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value == E:
                m.__dict__[name] = E2


@torch.no_grad()
def _slice_family(parent: nn.Module, block, ids: Sequence[int]) -> None:
    E, E2 = block.num_experts, len(ids)
    index = torch.tensor(list(ids), dtype=torch.long)
    _slice(block._family_router, E, index)
    _slice(block.hf_experts, E, index)
    _slice(parent, E, index, recurse=False)  # the family block's own: AFMoE's, LFM2-MoE's expert_bias
    set_expert_counts(parent, E, E2)  # the family's router and the block's experts are both inside it
    set_expert_counts(block._family_router, E, E2, COUNT_NAMES + ("out_features",))  # PhiMoE's router is a Linear
    block.experts = nn.ModuleList([ExpertSlot(i) for i in range(E2)])
    block.num_experts, block.num_columns = E2, block.config.check_columns(E2)
    block._fused_layout, block._fused = None, None
    block._looped = LoopedExperts(block.experts)
    if block.global_balance is not None:
        block.global_balance.counts = block.global_balance.counts.index_select(0, index)
    block.routing, block.aux_losses, block.aux_loss = None, {}, torch.zeros(())


class _Restricted(TorchFunctionMode):
    """Inside: the router's gate (``F.linear`` with its weight) gives -inf for the removed experts' columns."""

    def __init__(self, weight: torch.Tensor, removed: torch.Tensor):
        super().__init__()
        self.weight, self.removed = weight, removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func is F.linear and isinstance(weight, torch.Tensor) and weight.shape == self.weight.shape and \
                weight.data_ptr() == self.weight.data_ptr():  # the gate weight, or the same memory as a view
            out = out.index_fill(-1, self.removed.to(out.device), float("-inf"))
        return out


def _find(parent: nn.Module, block) -> str:
    return next(name for name, m in parent.named_modules() if m is block)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the family's MoE block returned {type(out).__name__}")


@torch.no_grad()
def check_restricted(parent: nn.Module, block, ids: Sequence[int], where: str) -> None:
    """On copies of ``parent``: sliced (E₂ experts) vs restricted (E experts, removed ones unreachable)."""
    inside = _find(parent, block)
    sliced, restricted = copy.deepcopy(parent).eval(), copy.deepcopy(parent).eval()  # no jitter, no dropout
    _slice_family(sliced, sliced.get_submodule(inside), ids)
    other = restricted.get_submodule(inside)
    E = block.num_experts
    removed = torch.tensor(sorted(set(range(E)) - set(ids)), dtype=torch.long)
    for owner in [*other._family_router.modules(), restricted]:  # additive selection biases: never chosen
        for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            if t is not None and t.is_floating_point() and "bias" in name and t.dim() and t.shape[-1] == E:
                t.data.index_fill_(t.dim() - 1, removed.to(t.device), float("-inf"))
    weight = _router_weight(other)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, TOKENS, block.input_dim, generator=gen).to(weight.device, _dtype(parent))
    try:
        want = _first_tensor(_call(restricted, x, _Restricted(weight, removed)))
        got = _first_tensor(sliced(x))
    except Exception as err:  # noqa: BLE001 (family code)
        raise ValueError(f"{where}: {block.source} could not be checked after removing experts "
                         f"({type(err).__name__}: {err}); prune / merge refuse it") from None
    tol = 1e-5 if got.dtype in (torch.float32, torch.float64) else 1e-2
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise ValueError(f"{where}: {block.source} with the kept experts does not route as its router restricted to "
                         f"them (max |difference| {(got.float() - want.float()).abs().max():.2e} on random tokens); "
                         f"prune / merge refuse it")


def _call(module: nn.Module, x: torch.Tensor, mode: TorchFunctionMode):
    with mode:
        return module(x)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def resize_family_block(parent: nn.Module, block, ids: Sequence[int]) -> None:
    """Keep experts ``ids`` of the family-routed ``block`` (inside the family's MoE block ``parent``), in place;
    :func:`check_restricted` first."""
    _slice_family(parent, block, ids)


@torch.no_grad()
def merge_family_rows(block, groups: List[List[int]], weights: List[List[float]], dominants: List[int]) -> None:
    """Row ``dominants[g]`` of every stacked expert tensor := ``Σ_i weights[g][i]`` · row ``groups[g][i]``."""
    E = block.num_experts
    for t in list(block.hf_experts.parameters()) + list(block.hf_experts.buffers()):
        if t.dim() == 0 or t.shape[0] != E or not t.is_floating_point():
            continue
        rows = t.detach().double()
        for group, w, dominant in zip(groups, weights, dominants):
            if len(group) > 1:
                t[dominant] = sum(float(wi) * rows[i] for wi, i in zip(w, group)).to(t.dtype)
