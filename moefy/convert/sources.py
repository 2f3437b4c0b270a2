"""Experts from several modules (Branch-Train-MiX, mergekit-moe): expert i of a mixture is a copy of module i.

- Module level, :func:`expert_copies`: ``moefy(base, experts_from=[m1, m2, m3])`` makes expert i a deep copy of
  ``m_i``; the base only gives the route and the router's input size. Every ``m_i`` must have the base's parameter
  names and shapes.
- Model level, :func:`model_sources`: ``moefy(base_model, target=..., experts_from=[model_a, model_b],
  rest=...)`` makes expert i of the mixture at path ``p`` a copy of ``model_i.get_submodule(p)``. Outside the
  targets the model is the base's (``rest="base"``, mergekit-moe's ``base_model``) or, with ``rest="average"``
  (Branch-Train-MiX: the attention / embeddings / norms of the branches averaged), the element-wise mean of the
  ``experts_from`` models, written into the base model's tensors in place. Non-floating tensors (integer
  buffers) keep the base's values.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..checks import check_choice

__all__ = ["expert_copies", "model_sources"]
logger = logging.getLogger(__name__)

RESTS = ("base", "average")


def check_sources(experts_from, name: str = "experts_from") -> List[nn.Module]:
    """``experts_from`` as a non-empty list of modules (TypeError / ValueError naming the argument otherwise)."""
    if isinstance(experts_from, nn.Module) or not isinstance(experts_from, Sequence) or isinstance(experts_from, str):
        raise TypeError(f"{name} must be a list of nn.Module (one per expert), got {type(experts_from).__name__}")
    if len(experts_from) == 0:
        raise ValueError(f"{name} must hold at least one module, got an empty {type(experts_from).__name__}")
    for i, m in enumerate(experts_from):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}[{i}] must be an nn.Module, got {type(m).__name__}")
    return list(experts_from)


def check_rest(rest, target, experts_from, num_experts=None) -> None:
    """``rest`` is one of :data:`RESTS`; anything but ``"base"`` needs a ``target`` and ``experts_from``; a given
    ``num_experts`` must be ``len(experts_from)`` (checked before ``rest="average"`` writes over the base)."""
    check_choice(rest, "rest", RESTS)
    num_experts_for(num_experts, experts_from)
    if rest != "base" and (target is None or experts_from is None):
        raise ValueError(f"rest={rest!r} needs target=... and experts_from=[models]: it says what a moefied model "
                         f"is outside its targets")


def num_experts_for(num_experts: Optional[int], experts_from) -> Optional[int]:
    """E: ``num_experts`` (default 4), or ``len(experts_from)``, which a given ``num_experts`` must equal."""
    if experts_from is None:
        return 4 if num_experts is None else num_experts
    n = len(check_sources(experts_from))
    if num_experts is not None and num_experts != n:
        raise ValueError(f"num_experts={num_experts!r} but experts_from holds {n} modules: expert i is a copy of "
                         f"experts_from[i], so leave num_experts out or pass num_experts={n}")
    return n


def _first_mismatch(want: Dict[str, torch.Size], got: Dict[str, torch.Size], what: str) -> Optional[str]:
    for key, shape in want.items():
        if key not in got:
            return f"has no {what} {key!r} (the base's has shape {tuple(shape)})"
        if got[key] != shape:
            return f"{what} {key!r} has shape {tuple(got[key])}, the base's {tuple(shape)}"
    extra = next((k for k in got if k not in want), None)
    return None if extra is None else f"has a {what} {extra!r} that the base lacks"


def expert_copies(base: nn.Module, num_experts: int, experts_from=None, name: str = "experts_from") -> List[nn.Module]:
    """The E experts of a mixture of ``base``: E deep copies of it, or one deep copy of each ``experts_from[i]``.

    Raises:
        ValueError: an ``experts_from[i]`` whose parameter names / shapes differ from the base's (the first
            mismatch is named).
    """
    if experts_from is None:
        return [copy.deepcopy(base) for _ in range(num_experts)]
    sources = check_sources(experts_from, name)
    want = {n: p.shape for n, p in base.named_parameters()}
    for i, m in enumerate(sources):
        bad = _first_mismatch(want, {n: p.shape for n, p in m.named_parameters()}, "parameter")
        if bad:
            raise ValueError(f"{name}[{i}] ({type(m).__name__}) {bad}: every expert source must have the base "
                             f"{type(base).__name__}'s parameter names and shapes")
    return [copy.deepcopy(m) for m in sources]


def model_sources(base: nn.Module, paths: Sequence[str], experts_from, rest: str = "base") -> Dict[str, List[nn.Module]]:
    """For every target path ``p``: ``[model_i.get_submodule(p) for model_i in experts_from]`` (not copied yet:
    the mixture copies them). With ``rest="average"`` first overwrites every state-dict tensor of ``base``
    outside the targets with the mean over the ``experts_from`` models (in place); logs what the rest is.

    Raises:
        ValueError: a model whose state-dict keys / shapes differ from the base's, or ``rest`` unknown.
    """
    check_choice(rest, "rest", RESTS)
    models = check_sources(experts_from)
    own = base.state_dict()
    want = {k: t.shape for k, t in own.items()}
    for i, m in enumerate(models):
        bad = _first_mismatch(want, {k: t.shape for k, t in m.state_dict().items()}, "state_dict entry")
        if bad:
            raise ValueError(f"experts_from[{i}] ({type(m).__name__}) {bad}: the experts_from models must share "
                             f"the base model's architecture (same state_dict keys and shapes)")
    sources = {}
    for p in paths:
        sources[p] = []
        for i, m in enumerate(models):
            try:
                sources[p].append(m.get_submodule(p))
            except AttributeError as err:
                raise ValueError(f"experts_from[{i}] ({type(m).__name__}) has no submodule {p!r}") from err
    outside = [k for k in own if not any(k.startswith(p + ".") for p in paths)]
    if rest == "average":
        states = [m.state_dict() for m in models]
        with torch.no_grad():
            means = {k: torch.stack([s[k].to(own[k].device, torch.float64) for s in states]).mean(0)
                     for k in outside if own[k].is_floating_point()}  # all means first: base may be a source
            for k, mean in means.items():
                own[k].copy_(mean.to(own[k].dtype))
    logger.info("moefy: experts of %d target(s) from %d models (expert i = experts_from[i]'s module); outside the "
                "targets (%d state_dict entries) %s", len(paths), len(models), len(outside),
                "the base model's own weights" if rest == "base" else
                f"the element-wise mean of the {len(models)} experts_from models, written over the base's")
    return sources
