"""Which routing keeps a module exact inside a mixture: :func:`infer_routing` / :func:`explain_routing`.

Per-token routing runs every expert on a bag of rows ``(n, D)`` gathered from all positions of all samples,
so it is exact only for a position-wise module: one whose output row ``t`` depends on input row ``t`` alone
(an FFN: Linear / HF ``Conv1D`` layers, activations, dropout, norms over the features). Everything else
(attention, convolutions, recurrences, a ``cumsum`` over the sequence) must see whole samples.

The rules, in order: known position-wise layers and Sequentials of them -> tokens; a module containing
conv / batch norm / attention / RNN layers -> samples; else a probe (below) -> tokens or samples; a probe
that cannot run (unknown input size, a forward that needs more arguments) -> tokens for the HF FFN classes
of :data:`HF_POSITION_WISE` (``BertOutput(hidden, input_tensor)``), samples with a warning for the rest.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..checks import check_choice, check_int, check_module
from ..config import ROUTE_ALIASES, ROUTES
from ..modes import evaluating
from ..dispatch.fused import ELEMENTWISE

_ELEMENTWISE = ELEMENTWISE + (nn.PReLU, nn.Dropout)  # position-wise, though not fusable
_POSITION_WISE = (nn.Linear, nn.LayerNorm, *_ELEMENTWISE) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CHANNELS_FIRST = _CONV + (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_MIXING = _CHANNELS_FIRST + (nn.MultiheadAttention, nn.RNNBase, nn.Transformer, nn.TransformerEncoderLayer,
                             nn.TransformerDecoderLayer)

# The fallback where a probe cannot run: HF position-wise FFN classes (matched by name, transformers stays
# optional). BertOutput / BertSelfOutput take (hidden_states, input_tensor): dense, dropout, LayerNorm(h + input).
HF_POSITION_WISE = frozenset({
    "LlamaMLP", "MistralMLP", "MixtralBlockSparseTop2MLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP",
    "Gemma3MLP", "PhiMLP", "Phi3MLP", "GPT2MLP", "GPTNeoXMLP",
    "BertIntermediate", "BertOutput", "BertSelfOutput", "RobertaIntermediate", "RobertaOutput",
    "RobertaSelfOutput", "T5DenseActDense", "T5DenseGatedActDense",
})


class RouteChoice(NamedTuple):
    """``route`` ('tokens' / 'samples'), ``input_dim`` (None if unknown), ``feature_dim``, ``reason`` (for the
    log) and ``unsure`` (True where moefy could not classify the module and fell back to per-sample routing)."""
    route: str
    input_dim: Optional[int]
    feature_dim: int
    reason: str
    unsure: bool = False


def _hf_name(m: nn.Module, names: Tuple[str, ...]) -> bool:
    return type(m).__name__ in names and type(m).__module__.startswith("transformers")


def _position_wise(module: nn.Module) -> bool:
    """Linear / norms / elementwise layers, or Sequentials of them: they act on each vector on its own."""
    if isinstance(module, nn.Sequential):
        return len(module) > 0 and all(_position_wise(m) for m in module)
    return isinstance(module, _POSITION_WISE)


def _first_input_layer(module: nn.Module) -> Tuple[Optional[int], bool]:
    """``(feature size, channels first)`` of the first submodule (``module.modules()`` order) that declares
    its input features: Linear, HF Conv1D (``nx``), conv, attention, RNN, norms."""
    for m in module.modules():
        for attr in ("in_features", "in_channels", "embed_dim", "input_size", "d_model", "num_features",
                     "num_channels"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr), isinstance(m, _CHANNELS_FIRST)
        if _hf_name(m, ("Conv1D",)) and isinstance(getattr(m, "nx", None), int):
            return m.nx, False
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return m.normalized_shape[0], False
    return None, False


def _leaf_types(module: nn.Module) -> str:
    names = dict.fromkeys(type(m).__name__ for m in module.modules() if not list(m.children()))
    return ", ".join(names) or "no layers"


@torch.no_grad()
def probe_position_wise(module: nn.Module, input_dim: int) -> bool:
    """Whether ``module`` acts on every row on its own: ``f(x)`` for a random ``x`` (2, 5, D), read as 10 rows,
    equals ``f`` of 7 of those rows in shuffled order, and ``f(x[:, perm])`` is ``f(x)[:, perm]``.

    Runs in eval mode without gradients (train flags restored). Raises what the forward raises (a forward
    that needs other arguments) and TypeError for an output that is not a tensor with the (2, 5) leading dims.
    """
    check_module(module, "module")
    check_int(input_dim, "input_dim", min=1)
    param = next(module.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None and param.is_floating_point() else (None, None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, input_dim, generator=gen).to(device=device, dtype=dtype)  # (2, 5, D)
    rows = torch.randperm(10, generator=gen)[:7].to(x.device)  # (7,) some rows, shuffled
    perm = torch.randperm(5, generator=gen).to(x.device)  # (5,) the positions permuted
    with evaluating(module):
        y = module(x)  # (2, 5, ...)
        if not (isinstance(y, torch.Tensor) and y.is_floating_point() and y.shape[:2] == (2, 5)):
            raise TypeError(f"probe output must be a floating tensor (2, 5, ...), got "
                            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        y_rows = module(x.reshape(10, input_dim)[rows])  # (7, ...)
        y_perm = module(x[:, perm])  # (2, 5, ...)
    tol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 3e-2
    same = lambda a, b: a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)  # noqa: E731
    return same(y_rows, y.reshape(10, *y.shape[2:])[rows]) and same(y_perm, y[:, perm])


def explain_routing(module: nn.Module, route: Optional[str] = None, input_dim: Optional[int] = None) -> RouteChoice:
    """:func:`infer_routing` with the reason for the log (see the module docstring for the rules); a given
    ``route`` is kept (no probe), a given ``input_dim`` is the size the probe uses."""
    check_module(module, "module")
    if input_dim is not None:
        check_int(input_dim, "input_dim", min=1)
    size, channels_first = _first_input_layer(module)
    size = size if input_dim is None else input_dim
    if route is not None:
        check_choice(ROUTE_ALIASES.get(route, route), "route", ROUTES)
        return RouteChoice(route, size, 1 if channels_first and route != "tokens" else -1, f"route={route!r} given")
    if _position_wise(module):
        return RouteChoice("tokens", size, -1, f"position-wise layers: {_leaf_types(module)}")
    feature_dim = 1 if channels_first else -1
    mixing = next((m for m in module.modules() if isinstance(m, _MIXING) or "Attention" in type(m).__name__), None)
    if mixing is not None:  # (HF attention classes: LlamaAttention, BertSelfAttention, ...)
        what = "channels on dim 1" if isinstance(mixing, _CHANNELS_FIRST) else "mixes positions"
        return RouteChoice("samples", size, feature_dim, f"contains {type(mixing).__name__}: {what}")
    known = type(module).__name__ in HF_POSITION_WISE
    if size is None:
        why = "no input size to probe it with (pass input_dim=D)"
    else:
        try:
            if probe_position_wise(module, size):
                return RouteChoice("tokens", size, -1, f"position-wise: probe on (2, 5, {size}) rows matched; "
                                                       f"layers {_leaf_types(module)}")
            return RouteChoice("samples", size, feature_dim,
                               f"mixes positions: probe on (2, 5, {size}) rows did not match")
        except Exception as err:  # any forward may fail on a bare (2, 5, D) input: that is what we learn
            why = f"probe failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if known:
        return RouteChoice("tokens", size, -1, f"known position-wise HF module {type(module).__name__}; {why}")
    return RouteChoice("samples", size, feature_dim, f"cannot classify it: {why}", unsure=True)


def infer_routing(module: nn.Module) -> Tuple[str, Optional[int], int]:
    """``(route, input_dim, feature_dim)`` that keep ``module`` exact inside a mixture.

    Per token for position-wise modules: Linear, Sequentials of Linear / norms / activations / dropout, and
    any module the probe (:func:`probe_position_wise`) finds acting on each row alone (SwiGLU, HF FFNs such as
    LlamaMLP, GPT2MLP, BertIntermediate); per sample for convolutions (``feature_dim=1``), attention, RNNs,
    modules that mix positions and modules moefy cannot probe (see :func:`explain_routing`).
    ``input_dim`` is the input size of the first layer that declares one (None if none does).
    """
    choice = explain_routing(module)
    return choice.route, choice.input_dim, choice.feature_dim
