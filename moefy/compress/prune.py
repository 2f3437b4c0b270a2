"""Remove the least important experts of every MoE block: :func:`prune_experts`."""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import nn

from ..block import MoEBlock
from .calibrate import named_blocks
from .resize import check_resizable, check_resize, expert_groups, keep_counts, resize, sync_hf_config

__all__ = ["prune_experts", "check_scores", "top_experts", "prepare"]


def check_scores(blocks: Mapping[str, MoEBlock], scores) -> Dict[str, torch.Tensor]:
    """``scores`` as ``{block name: (E,) float64 CPU tensor}``; ValueError unless it has one finite (E,) vector for
    every block of the model (as :func:`~moefy.compress.expert_scores` returns)."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict {{block name: tensor (E,)}} (moefy.compress.expert_scores), got "
                        f"{type(scores).__name__}")
    missing, extra = sorted(set(blocks) - set(scores)), sorted(set(scores) - set(blocks))
    if missing or extra:
        raise ValueError(f"scores do not match the model: no scores for blocks {missing[:4]}, scores for "
                         f"{extra[:4]}, which are not MoE blocks of it (the blocks are {list(blocks)[:4]}"
                         f"{' ...' if len(blocks) > 4 else ''}); score this model with expert_scores(model, data)")
    out = {}
    for name, block in blocks.items():
        s = scores[name]
        s = torch.as_tensor(s) if not isinstance(s, torch.Tensor) else s
        if s.shape != (block.num_experts,) or not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)} and dtype {s.dtype}; the block has "
                             f"{block.num_experts} experts: a real vector of shape ({block.num_experts},)")
        s = s.detach().double().cpu()
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{name!r}] has non-finite values; scores must be finite")
        out[name] = s
    return out


def prepare(model: nn.Module, keep, scores):
    """``(blocks, expert counts now, counts to keep, checked scores)`` of ``model``, every argument checked and
    every block found resizable before anything changes."""
    blocks = named_blocks(model)
    before = {name: block.num_experts for name, block in blocks.items()}
    counts = keep_counts(blocks, keep)
    scores = check_scores(blocks, scores)
    for name, block in blocks.items():
        check_resizable(name, block)
    return blocks, before, counts, scores


def top_experts(scores: torch.Tensor, keep: int, n_group: int = 1) -> List[int]:
    """The ``keep`` highest of ``scores`` (E,), in index order; ties go to the lower index. With ``n_group``
    groups of E/n_group experts (group-limited routing), keep/n_group from every group, so the groups stay equal."""
    E = scores.shape[0]
    size, per_group = E // n_group, keep // n_group
    ids: List[int] = []
    for g in range(n_group):
        group = scores[g * size:(g + 1) * size]
        order = sorted(range(size), key=lambda i: (-float(group[i]), i))
        ids += [g * size + i for i in sorted(order[:per_group])]
    return ids


def prune_experts(model: nn.Module, keep, scores: Mapping[str, torch.Tensor]) -> Dict[str, List[int]]:
    """Keep the highest-scoring experts of every MoE block of ``model`` and remove the others, in place.

    Each block becomes an ordinary moefy block of fewer experts (:func:`~moefy.compress.resize.resize_block`):
    the kept experts in their old order, their router rows (gate, noise std, selection bias); a token's scores
    are computed over the kept experts only, and renormalised over its picks as the block's router does. A
    transformers model's expert count in its config follows (when every block keeps the same number), so
    :func:`moefy.hf.export` / ``save_pretrained`` write the smaller architecture.

    Args:
        model: a moefied model or one imported by :func:`moefy.hf.from_hf` (a RoutingConfig family, or a
            family-routed one whose router passes :mod:`moefy.compress.family`'s check).
        keep: experts to keep per block: an int, a fraction in (0, 1] of each block's E, ``{block name: int}``,
            or a list of ints (one per block, in module order). Each must be in [k, E]; with ``n_group`` groups a
            multiple of n_group (that many per group are kept).
        scores: ``{block name: (E,)}``, higher = keep (:func:`~moefy.compress.expert_scores`, or any vector:
            ``torch.rand(E)`` is random pruning).
    Returns:
        ``{block name: the old indices of the kept experts}``.
    Raises:
        ValueError: a ``keep`` outside [k, E], ``scores`` that do not match the model's blocks, a block moefy
            cannot resize (expert-parallel, a PEFT-wrapped router, a family-routed one that fails
            :mod:`moefy.compress.family`'s check). Nothing is changed then.
    """
    blocks, before, counts, scores = prepare(model, keep, scores)
    kept = {name: top_experts(scores[name], counts[name], expert_groups(block)) for name, block in blocks.items()}
    for name, block in blocks.items():
        check_resize(model, name, block, kept[name])
    for name, block in blocks.items():
        resize(model, name, block, kept[name])
    sync_hf_config(model, blocks, before)
    return kept
