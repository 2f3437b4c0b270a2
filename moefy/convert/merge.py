"""Back to dense: :func:`merge` the experts of one mixture into one module, :func:`unmoefy` a whole model."""
from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_module
from .granular import merged_copies
from .mixture import ModuleMixture
from .surgery import _set_submodule


def merge(mixture: MoEBlock, how: Union[str, int, Sequence[float], torch.Tensor] = "mean") -> nn.Module:
    """One dense module from a mixture of same-shaped experts.

    Args:
        mixture: a mixture whose experts share parameter names and shapes (any :func:`moefy` mixture).
        how: ``"mean"`` averages every floating parameter and buffer over the experts; an int picks that
            expert; a sequence / tensor of E non-negative weights takes the weighted average (e.g. the
            experts' token counts). Integer buffers come from expert 0. For a granular mixture
            (``granularity`` G > 1) the experts here are its r = E/G copies, each rebuilt whole
            (:func:`~moefy.convert.granular.merged_copies`): ``how`` picks or weights copies.
    Returns:
        a new module (a deep copy), the type of the experts.
    """
    if not isinstance(mixture, MoEBlock):
        raise TypeError(f"mixture must be a MoEBlock, got {type(mixture).__name__}")
    if getattr(mixture, "shared_experts", None) is not None:
        raise ValueError("mixture has shared experts: their output adds to the routed experts', so no average of "
                         "the experts is the dense module; merge needs a mixture without shared_experts")
    # a granular mixture: first its r = E/G dense copies (slices concatenated, down / G); `how` then counts copies
    experts = merged_copies(mixture) if getattr(mixture, "granularity", 1) > 1 else list(mixture.experts)
    num = len(experts)
    if isinstance(how, int) and not isinstance(how, bool):
        if not 0 <= how < num:
            raise ValueError(f"how: expert index must be in [0, {num - 1}], got {how}")
        dense = copy.deepcopy(experts[how])
    else:
        if isinstance(how, str):
            if how != "mean":
                raise ValueError(f"how must be 'mean', an expert index or E weights, got {how!r}")
            coefs = torch.full((num,), 1.0 / num, dtype=torch.float64)
        else:
            try:
                coefs = torch.as_tensor(how, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"how must be 'mean', an expert index or {num} weights, got {how!r}") from None
            if (coefs.dim() != 1 or coefs.numel() != num or not torch.isfinite(coefs).all() or (coefs < 0).any()
                    or coefs.sum() <= 0):
                raise ValueError(f"how: weights must be {num} non-negative numbers, finite and not all zero; "
                                 f"got {how!r}")
            coefs = coefs / coefs.sum()
        dense = copy.deepcopy(experts[0])
        states = [e.state_dict(keep_vars=True) for e in experts]
        with torch.no_grad():
            for name, t in dense.state_dict(keep_vars=True).items():
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    continue
                group = [s.get(name) for s in states]
                if any(g is None or g.shape != t.shape for g in group):
                    raise ValueError(f"merge: experts differ in {name!r}; only same-shaped experts can be averaged")
                avg = sum(c.item() * g.detach().double() for c, g in zip(coefs, group))
                t.copy_(avg.to(t.dtype))
    for m in dense.modules():
        for attr in ("expert_id", "mixture_id"):
            m.__dict__.pop(attr, None)
    return dense


def unmoefy(model: nn.Module, how: Union[str, int, Sequence[float], torch.Tensor] = "mean") -> nn.Module:
    """Replace every :func:`moefy` mixture in ``model`` by :func:`merge` of its experts, in place.

    Mixtures made by :func:`moefy_chain` are split back into their original modules and places, so the
    dense model has the original structure and ``state_dict`` keys. Returns ``model`` (or the merged module
    if ``model`` itself is a mixture).
    """
    check_module(model, "model")
    if isinstance(model, ModuleMixture):
        return merge(model, how)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleMixture)]
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
    for name, mixture in found:
        dense = merge(mixture, how)
        if mixture.dense_sources is None:
            _set_submodule(model, name, dense)
            continue
        root = ".".join(name.split(".")[:-mixture.dense_root_depth])
        for child, path in mixture.dense_sources.items():
            _set_submodule(model, f"{root}.{path}" if root else path, getattr(dense, child))
    if not any(isinstance(m, MoEBlock) for m in model.modules()):
        model.__dict__.pop("save_pretrained", None)  # dense again: the model's own save_pretrained (see save.py)
    return model
