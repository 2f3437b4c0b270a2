"""A block with fewer experts, in place: :func:`resize_block`; the per-layer budgets ``keep`` of
:func:`~moefy.compress.prune_experts` / :func:`~moefy.compress.merge_experts`: :func:`keep_counts`.

A resized block is an ordinary moefy block of E₂ < E experts: its expert list, its router's rows (gate, learned
noise std, selection bias) and its balancing counts are those of the kept (or merged) experts, in the order given;
null-expert and hole columns stay after them. The router computes its scores over the remaining columns, so a
softmax renormalises over the kept experts, as the block's router does for any set of experts.
"""
from __future__ import annotations

import logging
import math
from numbers import Integral, Real
from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..block import MoEBlock
from ..dispatch.experts import FusedExperts, LoopedExperts
from ..dispatch.fused import fused_layout
from ..hf.families import FAMILIES
from ..hf.generic import HFExpertsBlock
from ..wrappers import plain_linear
from .family import (check_family_block, check_family_keep, check_restricted, family_groups, resize_family_block,
                     set_expert_counts)

logger = logging.getLogger(__name__)

__all__ = ["keep_counts", "resize_block", "resize", "check_resize", "check_resizable", "expert_groups",
           "sync_hf_config"]


# a transformers config's fields for the number of routed experts (families name it differently)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def check_resizable(name: str, block: MoEBlock) -> None:
    """ValueError naming ``name`` where moefy cannot change ``block``'s experts: a family-routed block (its router
    is the family's module), experts sharded over ranks, a wrapped router gate (PEFT), a replay in progress."""
    where = name or "model"
    if block.parallel is not None:
        raise ValueError(f"{where}: its experts are sharded over ranks (expert_parallel); compress the full "
                         f"model (moefy.full_state_dict) on one process")
    if _family_routed(block):
        check_family_block(where, block)
    elif not plain_linear(block.router.gate):
        raise ValueError(f"{where}.router.gate is a {type(block.router.gate).__name__} (a PEFT adapter, hooks or a "
                         f"parametrization): its rows cannot be selected; merge or remove it first "
                         f"(peft_model.merge_and_unload())")
    if block.router_replay is not None:
        raise ValueError(f"{where}: a RouterReplay is recording or replaying it; compress outside replay()")


def keep_counts(blocks: Mapping[str, MoEBlock], keep) -> Dict[str, int]:
    """``{block name: experts to keep}`` from ``keep``: an int for every block, a fraction in (0, 1] of each
    block's E (rounded, at least 1), or ``{block name: int}`` / a sequence of ints, one per block in order.
    Every count must be in [k, E] (a block cannot keep fewer experts than it picks per token) and, with
    ``n_group`` expert groups, a multiple of n_group."""
    names = list(blocks)
    if isinstance(keep, Mapping):
        missing, extra = sorted(set(names) - set(keep)), sorted(set(keep) - set(names))
        if missing or extra:
            raise ValueError(f"keep: a dict needs one count per MoE block; missing {missing[:4]}, not blocks "
                             f"{extra[:4]}; the blocks are {names[:4]}{' ...' if len(names) > 4 else ''}")
        counts = {n: keep[n] for n in names}
    elif isinstance(keep, (list, tuple)):
        if len(keep) != len(names):
            raise ValueError(f"keep: {len(keep)} counts for {len(names)} MoE blocks; give one per block")
        counts = dict(zip(names, keep))
    elif isinstance(keep, Integral) and not isinstance(keep, bool):
        counts = {n: int(keep) for n in names}
    elif isinstance(keep, Real) and not isinstance(keep, bool):
        if not 0 < keep <= 1 or math.isnan(keep):
            raise ValueError(f"keep={keep!r}: a fraction of each block's experts must be in (0, 1]; an int keeps "
                             f"that many")
        counts = {n: max(1, round(float(keep) * b.num_experts)) for n, b in blocks.items()}
    else:
        raise TypeError(f"keep must be an int, a fraction in (0, 1], a dict {{block name: int}} or a list of ints, "
                        f"got {type(keep).__name__}")
    for name, n in counts.items():
        block = blocks[name]
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise TypeError(f"keep[{name!r}] must be an int, got {type(n).__name__}")
        low = 1 if block.config.expert_choice else math.ceil(block.k)
        if not low <= n <= block.num_experts:
            raise ValueError(f"keep={int(n)} for {name or 'model'}: must be in [{low}, {block.num_experts}] (its k="
                             f"{block.k} experts per token, E={block.num_experts} experts); a block cannot keep "
                             f"fewer experts than it picks per token")
        groups = expert_groups(block)
        if groups > 1 and n % groups:
            raise ValueError(f"keep={int(n)} for {name or 'model'}: its router picks in n_group={groups} groups of "
                             f"experts; keep a multiple of {groups} (the same number in every group)")
        granularity = getattr(block, "granularity", 1)
        if granularity > 1 and n % granularity:
            raise ValueError(f"keep={int(n)} for {name or 'model'}: its experts are slices of "
                             f"granularity={granularity} (moefy.save records it); keep a multiple of {granularity}")
        try:  # k must also fit in the kept groups: checked for every block before any block is resized
            block.config.check_columns(int(n))
            if _family_routed(block):
                check_family_keep(block, int(n))
        except ValueError as err:
            raise ValueError(f"keep={int(n)} for {name or 'model'}: {err}") from None
        counts[name] = int(n)
    family_counts = {n: c for n, c in counts.items() if _family_routed(blocks[n])}
    if len(set(family_counts.values())) > 1:
        raise ValueError(f"keep: family-routed blocks must keep the same number in every layer (got "
                         f"{family_counts}): their model's config has one expert count, which its own class, its "
                         f"save_pretrained and moefy.hf.export build every layer with")
    return counts


def _family_routed(block: MoEBlock) -> bool:
    return isinstance(block, HFExpertsBlock)


def expert_groups(block: MoEBlock) -> int:
    """The number of expert groups ``block``'s router picks in (``n_group``; a family router's own)."""
    return family_groups(block) if _family_routed(block) else block.config.n_group


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def check_resize(model: nn.Module, name: str, block: MoEBlock, ids: Sequence[int]) -> None:
    """Before anything changes: a family-routed block must route, with experts ``ids`` only, as its router
    restricted to them (:mod:`moefy.compress.family`; ValueError naming ``name`` otherwise). Other blocks: no-op."""
    if _family_routed(block):
        check_restricted(_parent(model, name), block, ids, name or "model")


def resize(model: nn.Module, name: str, block: MoEBlock, ids: Sequence[int]) -> None:
    """Keep experts ``ids`` of ``model``'s block ``name``, in place (after :func:`check_resize`)."""
    if _family_routed(block):
        resize_family_block(_parent(model, name), block, ids)
    else:
        resize_block(block, ids)


@torch.no_grad()
def resize_block(block: MoEBlock, ids: Sequence[int]) -> None:
    """Keep experts ``ids`` of ``block`` (in that order), with their router rows (gate, noise std, selection bias)
    and balancing counts, in place; ``block`` is a MoEBlock that :func:`check_resizable` accepts, ``ids`` E₂
    distinct expert indices in [0, E)."""
    E, E2 = block.num_experts, len(ids)
    if len(set(ids)) != E2 or not all(0 <= i < E for i in ids):
        raise ValueError(f"ids must be distinct expert indices in [0, {E}), got {list(ids)}")
    new_experts = [block.experts[i] for i in ids]
    columns = block.config.check_columns(E2)                 # validates k, groups before anything changes
    rows = torch.tensor(list(ids) + list(range(E, block.num_columns)), dtype=torch.long)  # (E₂',) kept columns
    router = block.router
    gate = router.gate
    weight = gate.weight.index_select(0, rows.to(gate.weight.device))
    _set_param(gate, "weight", weight)
    if gate.bias is not None:
        _set_param(gate, "bias", gate.bias.index_select(0, rows.to(gate.bias.device)))
    gate.out_features = columns
    if router.noise_std is not None:
        _set_param(router.noise_std, "weight", router.noise_std.weight.index_select(0, rows.to(weight.device)))
    if router.score_correction_bias is not None:
        router.score_correction_bias = router.score_correction_bias.index_select(0, rows.to(weight.device))
    if block.global_balance is not None:
        counts = block.global_balance.counts
        block.global_balance.counts = counts.index_select(0, rows.to(counts.device))
    if block.bias_balance is not None:
        counts = block.bias_balance.counts
        block.bias_balance.counts = counts.index_select(0, rows[:E2].to(counts.device))

    block.experts = nn.ModuleList(new_experts)
    block.num_experts, block.num_columns = E2, columns
    block._fused_layout = fused_layout(block.experts) if block.config.fused else None  # a subset of a fused set
    block._looped = LoopedExperts(block.experts)
    block._fused = FusedExperts(block.experts, block._fused_layout) if block._fused_layout else None
    for i, expert in enumerate(block.experts):
        expert.expert_id = i
        expert.mixture_id = block.moe_name
    block.routing, block.aux_losses, block.aux_loss = None, {}, torch.zeros(())  # the last forward's, stale


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """The parameter keeps its identity, so an optimizer built before holds it: an Adam-like state of the old
    shape then fails loudly at its next step instead of training a parameter the model no longer uses."""
    getattr(module, name).data = value.contiguous()


def sync_hf_config(model: nn.Module, blocks: Mapping[str, MoEBlock], before: Mapping[str, int]) -> None:
    """Set a transformers model's expert count to its blocks' E (the blocks had ``before`` {name: E} experts), so
    ``save_pretrained`` / :func:`moefy.hf.export` write the smaller architecture: the field its family names
    (``num_experts``, ``num_local_experts``, ...; for a family-routed model every such field that held the old
    count). Blocks of different sizes set it to the largest, with a warning: the architecture has one count per
    model, so :func:`moefy.hf.export` refuses the model naming each layer's count, while :func:`moefy.save` /
    ``save_pretrained`` and :func:`moefy.hf.load` keep each block's own count. A family-routed model's modules
    (the model's own ``num_experts``, which its router-logit aux loss one-hots with) follow its blocks' count. A
    model of another kind is left as it is."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return
    family = FAMILIES.get(model_type)
    old = set(before.values())
    routed = [b for b in blocks.values() if _family_routed(b)]
    if routed and len(old) == 1:  # the family's modules outside the blocks keep the count too (the model's own
        set_expert_counts(model, next(iter(old)), routed[0].num_experts)  # num_experts: its router-logit aux loss)
    fields = [family.num_experts] if family is not None else [
        f for f in EXPERT_COUNT_FIELDS if getattr(config, f, None) in old and not isinstance(getattr(config, f), bool)]
    fields = [f for f in fields if hasattr(config, f)]
    if not fields:
        return
    sizes = {name: b.num_experts for name, b in blocks.items()}
    for field in fields:
        setattr(config, field, max(sizes.values()))
    if len(set(sizes.values())) > 1:
        logger.warning("moefy.compress: the MoE blocks now have different expert counts (%s); config.%s is the "
                       "largest, %d: moefy.save and moefy.hf.load keep each block's count, moefy.hf.export refuses "
                       "the model (%s has one count per model)", ", ".join(f"{n}: {e}" for n, e in sizes.items()),
                       fields[0], max(sizes.values()), type(model).__name__)
