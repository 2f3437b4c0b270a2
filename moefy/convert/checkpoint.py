"""Dense checkpoints into moefied models: :func:`dense_key_map` and :func:`load_dense_state_dict`."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..checks import check_module
from .mixture import ModuleMixture


def dense_key_map(model: nn.Module) -> Dict[str, Optional[str]]:
    """For every key of ``model.state_dict()``: the key of the dense (pre-moefy) model it comes from.

    Expert keys ``<mixture>.experts.<e>.<rest>`` (and shared experts' ``<mixture>.shared_experts.<j>.<rest>``)
    map to ``<mixture>.<rest>`` (or, for :func:`moefy_chain` mixtures, to the key of the module the part was
    copied from); router and shared-gate keys map to None.
    """
    check_module(model, "model")
    mixtures = {n: m for n, m in model.named_modules() if isinstance(m, ModuleMixture)}
    mapping: Dict[str, Optional[str]] = {}
    for key in model.state_dict():
        owner = max((n for n in mixtures if n == "" or key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            mapping[key] = key
            continue
        mixture, prefix = mixtures[owner], owner + "." if owner else ""
        rest = key[len(prefix):]
        if not rest.startswith(("experts.", "shared_experts.")):  # shared experts are copies too
            mapping[key] = None
            continue
        rest = rest.split(".", 2)[2]
        if mixture.dense_sources is None:
            mapping[key] = prefix + rest
        else:
            child, _, leaf = rest.partition(".")
            root = ".".join(owner.split(".")[:-mixture.dense_root_depth])
            mapping[key] = (f"{root}." if root else "") + f"{mixture.dense_sources[child]}.{leaf}"
    return mapping


def load_dense_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True
                          ) -> Tuple[List[str], List[str]]:
    """Load a checkpoint of the dense model into its moefied version: every expert gets the dense weights,
    routers keep their current values.

    Returns:
        ``(missing_keys, unexpected_keys)`` of ``model`` / ``state_dict`` (router keys are never missing).
    Raises:
        RuntimeError: with ``strict``, if any key is missing or unexpected.
        ValueError: a checkpoint tensor has another shape than the entry it loads into (another
            number of features / experts' dimensions).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    granular = [n for n, m in model.named_modules() if getattr(m, "granularity", 1) > 1] if isinstance(
        model, nn.Module) else []
    if granular:  # its experts are slices: the split is not kept, so no dense tensor maps onto one
        raise ValueError(f"model: mixture {granular[0]!r} is granular (its experts are slices of the FFN); load the "
                         f"dense checkpoint into the dense model, then moefy it with granularity again")
    mapped, used, missing = {}, set(), []
    own = model.state_dict() if isinstance(model, nn.Module) else None
    for key, src in dense_key_map(model).items():
        if src is None:
            continue
        if src in state_dict:
            value = state_dict[src]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state_dict[{src!r}] must be a tensor, got {type(value).__name__}")
            if value.shape != own[key].shape:
                raise ValueError(f"state_dict[{src!r}] has shape {tuple(value.shape)} but {key} of "
                                 f"{type(model).__name__} has shape {tuple(own[key].shape)}: a checkpoint "
                                 f"of another model size")
            mapped[key] = value
            used.add(src)
        else:
            missing.append(key)
    unexpected = [k for k in state_dict if k not in used]
    if strict and (missing or unexpected):
        raise RuntimeError(f"load_dense_state_dict: missing keys {missing[:8]}, unexpected keys "
                           f"{unexpected[:8]} ({len(missing)} / {len(unexpected)} in all)")
    model.load_state_dict(mapped, strict=False)  # every mapped key is one of the model's own
    return missing, unexpected
