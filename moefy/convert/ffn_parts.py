"""The hidden neurons of an FFN: which layers make them and which layer reads them, for the upcycling methods
that cut or re-initialise an FFN along its hidden dim (:mod:`moefy.convert.granular`,
:mod:`moefy.convert.drop_upcycling`).

An FFN here computes ``down(act(up_1(x)) [* up_2(x)])``: the ``up`` layers (one, or two for a gated FFN:
gate and up) each make the H hidden neurons, the ``down`` layer reads them. A layer is an ``nn.Linear``
(weight (out, in): neuron ``j`` of an up layer is row ``j``, of the down layer column ``j``) or Hugging Face's
``Conv1D`` (weight (in, out): the other way round). Known layouts, by child names:

- ``gate_proj, up_proj -> down_proj`` (LlamaMLP, Qwen2MLP, MistralMLP, ...), ``w1, w3 -> w2`` (Mixtral),
  ``wi_0, wi_1 -> wo`` / ``wi -> wo`` (T5), ``c_fc -> c_proj`` (GPT2MLP), ``fc1 -> fc2`` (Phi, ViT),
  ``dense_h_to_4h -> dense_4h_to_h`` (GPT-NeoX);
- ``nn.Sequential(up, elementwise..., down)``, where ``up`` / ``down`` is a layer or a module holding one as
  ``.dense`` (``moefy_chain``'s ``Sequential(BertIntermediate, Linear)``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..checks import check_module
from .routes import _ELEMENTWISE

__all__ = ["FFNParts", "find_ffn_parts"]

_NAMED = ((("gate_proj", "up_proj"), "down_proj"), (("w1", "w3"), "w2"), (("wi_0", "wi_1"), "wo"),
          (("wi",), "wo"), (("c_fc",), "c_proj"), (("fc1",), "fc2"), (("dense_h_to_4h",), "dense_4h_to_h"))


class FFNParts(NamedTuple):
    """``up``: dotted names of the layers whose outputs are the hidden neurons; ``down``: the layer that reads
    them; ``hidden``: H; ``input_dim``: D, the features of ``x``."""
    up: Tuple[str, ...]
    down: str
    hidden: int
    input_dim: int


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (matched by name: transformers stays optional), weight (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _layer(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and is_conv1d(m))


def neuron_dim(layer: nn.Module, up: bool) -> int:
    """The dim of ``layer.weight`` that indexes the hidden neurons."""
    return (0 if up else 1) if isinstance(layer, nn.Linear) else (1 if up else 0)


def features(layer: nn.Module) -> Tuple[int, int]:
    """``(in, out)`` features of a Linear / Conv1D."""
    w = layer.weight
    return (w.shape[1], w.shape[0]) if isinstance(layer, nn.Linear) else (w.shape[0], w.shape[1])


def _sequential_parts(module: nn.Sequential) -> Optional[Tuple[Tuple[str, ...], str]]:
    if len(module) < 2:
        return None
    ends = []
    for i in (0, len(module) - 1):
        child = module[i]
        ends.append(str(i) if _layer(child) else f"{i}.dense" if _layer(getattr(child, "dense", None)) and
                    len(list(child.parameters())) == len(list(child.dense.parameters())) else None)
    middle = all(isinstance(m, _ELEMENTWISE) for m in list(module)[1:-1])
    return ((ends[0],), ends[1]) if None not in ends and middle else None


def find_ffn_parts(module: nn.Module) -> Optional[FFNParts]:
    """The :class:`FFNParts` of ``module``, or None where it is not an FFN of a known layout (see the module
    docstring) with consistent sizes: every up layer D -> H, the down layer H -> D' ."""
    check_module(module, "module")
    found = _sequential_parts(module) if isinstance(module, nn.Sequential) else next(
        ((up, down) for up, down in _NAMED
         if all(_layer(getattr(module, n, None)) for n in up + (down,))), None)
    if found is None:
        return None
    up, down = found
    sizes = [features(module.get_submodule(n)) for n in up]
    hidden, input_dim = sizes[0][1], sizes[0][0]
    if any(s != (input_dim, hidden) for s in sizes) or features(module.get_submodule(down))[0] != hidden:
        return None
    return FFNParts(up, down, hidden, input_dim)


def require_ffn_parts(module: nn.Module, name: str) -> FFNParts:
    """:func:`find_ffn_parts` or a ValueError naming the argument ``name`` that needs it."""
    parts = find_ffn_parts(module)
    if parts is None:
        raise ValueError(f"{name}: {type(module).__name__} is not an FFN moefy can cut along its hidden neurons "
                         f"(gate_proj/up_proj/down_proj, c_fc/c_proj, fc1/fc2, w1/w3/w2, or nn.Sequential(Linear, "
                         f"activation, Linear) with matching sizes)")
    return parts


def neuron_rows(module: nn.Module, parts: FFNParts) -> torch.Tensor:
    """(H, n_up·D) float64: every hidden neuron's weights in the up layers, side by side (k-means features)."""
    rows = []
    for name in parts.up:
        layer = module.get_submodule(name)
        w = layer.weight.detach().double()
        rows.append(w if neuron_dim(layer, True) == 0 else w.t())
    return torch.cat(rows, dim=1).cpu()
