"""Checkpoints of expert-parallel models: which entries are sharded (:func:`sharded_names`,
:func:`sharded_params`), and the full state dict from every rank's (:func:`merge_state_dicts`,
:func:`full_state_dict`, which also gathers FSDP2's DTensors), loadable unsharded or on any number of ranks.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set

import torch
import torch.distributed as dist
from torch import nn

from ..checks import check_module
from .expert_parallel import _check_initialised, _is_dtensor, _sharded_names


def sharded_names(model: nn.Module) -> List[str]:
    """Fully qualified names of the parameters and buffers that :func:`expert_parallel` sharded: the ones
    DDP must leave alone (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""
    check_module(model, "model")
    return _sharded_names(model)


def sharded_params(model: nn.Module) -> Set[nn.Parameter]:
    """The parameters that :func:`expert_parallel` sharded: what FSDP2 must leave alone
    (``fully_shard(module, ignored_params=sharded_params(model))`` on every module it shards)."""
    names = set(sharded_names(model))
    return {p for n, p in model.named_parameters() if n in names}


def merge_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Union of per-rank state dicts (``model.state_dict()`` saved on each rank) into one full state dict
    that loads into the unsharded model or an expert-parallel one on any number of ranks.

    Raises:
        ValueError: a key present in several shards (a replicated tensor) differs between them: the ranks
            diverged, and no shard can be trusted to speak for the others.
        TypeError: an entry is a DTensor (a piece of a parameter sharded by FSDP2 or tensor parallelism):
            gather it with :func:`full_state_dict` on every rank instead.
    """
    if isinstance(shards, (Mapping, str)) or not isinstance(shards, Sequence):
        raise TypeError(f"shards must be a sequence of state dicts (one per rank), got {type(shards).__name__}")
    if not shards:
        raise ValueError("shards must be a non-empty sequence of state dicts")
    merged: Dict[str, torch.Tensor] = {}
    for i, shard in enumerate(shards):
        if not isinstance(shard, Mapping):
            raise TypeError(f"shards[{i}] must be a mapping (a state dict), got {type(shard).__name__}")
        for key, value in shard.items():
            if _is_dtensor(value):
                raise TypeError(f"shards[{i}][{key!r}] is a DTensor (a piece of a parameter sharded by "
                                "fully_shard / tensor parallelism): gather the full state dict with "
                                "full_state_dict(model) on every rank")
            if key in merged and not _same(merged[key], value):
                raise ValueError(f"shards: replicated entry {key!r} differs between shard 0..{i - 1} and shard {i}")
            merged.setdefault(key, value)
    return merged


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return bool(a == b)


def full_state_dict(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> Dict[str, torch.Tensor]:
    """The unsharded state dict (every expert, replicated entries once), on every rank of ``group``.
    Collective; the experts' tensors travel through ``all_gather_object`` and come back on the CPU.

    Parameters sharded by FSDP2 (``fully_shard``: DTensors in ``model.state_dict()``) are gathered with
    ``DTensor.full_tensor()`` over their own mesh, so every rank of that mesh must call this too.

    Raises:
        RuntimeError: an expert-parallel expert is a DTensor: FSDP sharded the experts too (pass them as
            ``ignored_params``, see :func:`sharded_params`).
    """
    check_module(model, "model")
    _check_initialised("full_state_dict")
    sharded = set(sharded_names(model))
    state = model.state_dict()
    resharded = [k for k in sharded if _is_dtensor(state.get(k))]
    if resharded:
        raise RuntimeError(f"full_state_dict: expert-parallel entries are DTensors ({sorted(resharded)[0]}, ...): "
                           "fully_shard sharded the experts too; pass ignored_params=sharded_params(model)")
    state = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in state.items()}  # same order on every rank
    mine = {k: v.detach().cpu() for k, v in state.items() if k in sharded}
    everyone: List[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    replicated = {k: v for k, v in state.items() if k not in sharded}
    return merge_state_dicts([replicated, *everyone])
