"""Drop-upcycling (Nakamura et al., ICLR 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
Re-initialization"): every expert starts as a copy of the dense FFN with a fraction r of its hidden neurons
re-initialised, so the experts differ from the start and specialise faster.

Per expert, round(r·H) of its H hidden neurons (rounded half up) are drawn without replacement (torch's RNG:
``torch.manual_seed`` makes it reproducible; a new draw per expert); the same indices in every up/gate layer (the
neuron's weights, dim ``neuron_dim``) and in the down layer (its weights there). Every re-initialised value of a
weight matrix is drawn from ``N(mean, std²)`` of the ORIGINAL dense module's matrix it belongs to, as the paper
does. Biases are kept (the paper re-initialises weight matrices only). With r = 0 the experts are untouched, with
r = 1 every expert's weights are fresh draws (the paper's from-scratch limit with the dense statistics).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from ..checks import check_module, check_number
from .ffn_parts import FFNParts, neuron_dim, require_ffn_parts

__all__ = ["drop_upcycle"]


def _stats(module: nn.Module, parts: FFNParts):
    """{layer name: (mean, std)} of the dense module's weight matrices, float64."""
    out = {}
    for name in parts.up + (parts.down,):
        w = module.get_submodule(name).weight.detach().double()
        out[name] = (w.mean().item(), w.std().item())
    return out


@torch.no_grad()
def drop_upcycle(experts: Sequence[nn.Module], module: nn.Module, drop_fraction: float) -> List[torch.Tensor]:
    """Re-initialise ``drop_fraction`` of every expert's hidden neurons in place (see the module docstring).

    Args:
        experts: copies (or slices, :mod:`moefy.convert.granular`) of ``module``, each with H_e hidden neurons.
        module: the dense FFN they come from (its weight statistics), of a layout
            :func:`~moefy.convert.ffn_parts.find_ffn_parts` knows.
        drop_fraction: r in [0, 1].
    Returns:
        per expert, the (round(r·H_e),) long indices of the re-initialised neurons, in draw order.
    """
    check_module(module, "module")
    r = check_number(drop_fraction, "drop_fraction", low=0, high=1)
    if isinstance(experts, nn.Module) or not isinstance(experts, Sequence) or not all(
            isinstance(e, nn.Module) for e in experts):
        raise TypeError(f"experts must be a list of nn.Module, got {type(experts).__name__}")
    parts = require_ffn_parts(module, "drop_fraction")
    stats, chosen = _stats(module, parts), []
    for expert in experts:
        eparts = require_ffn_parts(expert, "experts")
        if eparts.up != parts.up or eparts.down != parts.down:
            raise ValueError(f"experts: {type(expert).__name__} does not have the layers of {type(module).__name__}")
        n = math.floor(r * eparts.hidden + 0.5)
        index = torch.randperm(eparts.hidden)[:n]  # (n,)
        for name, up in [(u, True) for u in parts.up] + [(parts.down, False)]:
            w = expert.get_submodule(name).weight  # (H_e, D) / (D, H_e) / transposed for Conv1D
            dim = neuron_dim(expert.get_submodule(name), up)
            mean, std = stats[name]
            shape = list(w.shape)
            shape[dim] = n
            fresh = torch.randn(shape, dtype=torch.float64, device=w.device) * std + mean  # (..n..)
            w.index_copy_(dim, index.to(w.device), fresh.to(w.dtype))
        chosen.append(index)
    return chosen
