"""The routing of a Hugging Face MoE model, observed as it runs: nothing converted, nothing replaced.

transformers 5 runs the experts of most MoE families as one module called ``experts(hidden_states, top_k_index,
top_k_weights)`` (``@use_experts_implementation``, ``transformers/integrations/moe.py``). :func:`hf_moe_layers`
finds those modules and wraps each in an :class:`HFMoELayer` that, while something watches it, turns every
experts call into a :class:`~moefy.routing.record.Routing` record: the indices (T, k) and weights (T, k) exactly
as the experts module received them, the count per expert, and the router logits (T, E') from the family's
router module (the one transformers records as ``router_logits``, or the block's ``gate`` / ``router``).
:class:`~moefy.observe.recorder.RoutingRecorder` reads these records as it reads a MoEBlock's ``block.routing``,
so its statistics, the training log and the plots work on the model as transformers ships it.

Only forward hooks and pre-hooks are used, and only while watched: the model's outputs are bit-identical with
and without them, and :meth:`HFMoELayer.unwatch` of the last watcher leaves no hook behind.

A few families route without such an experts call, or route to columns their experts never see; each has its
own reader (verified against what its experts receive, with a logged warning and the experts' own view where
that check fails):

- Llama 4 (``Llama4TextMoe``): every expert runs on every token scaled by a sigmoid score that is 0 off the top-k;
  the record is the router's top-k of its logits and those scores.
- JetMoE (``JetMoeMoE`` and its attention experts ``JetMoeMoA``): the router hands the experts sorted token lists;
  the record is rebuilt from them exactly.
- Doge (``DogeCDMoE``): product-key routing over K² embedding experts; the indices are the ones the expert
  embeddings are looked up with, the weights and the (T, K²) logits ``lx[i] + ly[j]`` come from the router logits.
- LongCat-Flash (``LongcatFlashMoE``): its zero experts add ``w·x`` (MoE++'s copy expert) and reach the experts
  module as weight-0 slots of a real expert; the record keeps the router's picks, the zero experts as
  ``null_columns = ("copy", ...)``.
- Zaya (``ZayaSparseMoeBlock``): its skip expert computes nothing and reaches the experts as expert 0 with weight 0;
  the record shows it as a ``"zero"`` null column (a dropped slot).

Conventions of the records (where they differ from a MoEBlock's): ``indices`` keep the family's slot order
(not sorted best first); ``probs`` is the softmax of the router logits over all E' columns, also for families
that score with a sigmoid (the recorder's entropy is that of the router's logit distribution); an index outside
``[0, E')`` (transformers' expert-parallel sentinel) is counted in ``dropped``. Recording reads the counts on the
host: one synchronisation per layer and forward on an accelerator, while watched.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checks import check_int, check_module, check_tensor
from ..routing.record import Routing
from ..routing.views import LastRoutingViews

logger = logging.getLogger(__name__)

__all__ = ["HFMoELayer", "HFLayerConfig", "hf_moe_layers", "is_hf_experts", "token_choice_routing"]


# ---------------------------------------------------------------------------------------------- records
@torch.no_grad()
def token_choice_routing(indices: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor, num_experts: int,
                         tokens_shape: Optional[Sequence[int]] = None,
                         null_columns: Tuple[str, ...] = ()) -> Routing:
    """The :class:`Routing` record of a token-choice step given as the experts receive it.

    Args:
        indices: (T, k) integer router columns per token (E' = ``logits.shape[-1]`` columns; one outside
            ``[0, E')`` is counted as dropped).
        weights: (T, k) combine weights.
        logits: (T, E') router logits; E' = E + len(null_columns).
        num_experts: E, the real experts (the first E columns).
        tokens_shape: leading shape of the routed input, ``prod == T`` (default ``(T,)``).
        null_columns: the kinds (``"copy"``, ``"constant"``, ``"zero"``) of columns E, E+1, ...; a slot sent to a
            ``"zero"`` column is counted in ``dropped`` (it computes nothing), as moefy's null experts.
    Returns:
        the record; ``host_counts`` already read.
    """
    for value, name in ((indices, "indices"), (weights, "weights"), (logits, "logits")):
        check_tensor(value, name)
    check_int(num_experts, "num_experts", min=1)
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() != 2 or weights.shape != indices.shape or logits.dim() != 2 or \
            logits.shape[0] != indices.shape[0]:
        raise ValueError(f"indices and weights must be (T, k) and logits (T, E'), got {tuple(indices.shape)}, "
                         f"{tuple(weights.shape)}, {tuple(logits.shape)}")
    columns, (tokens, k) = logits.shape[1], indices.shape
    if columns != num_experts + len(null_columns):
        raise ValueError(f"logits have {columns} columns but num_experts={num_experts} and null_columns="
                         f"{null_columns} make {num_experts + len(null_columns)}")
    logits = logits.detach().float()
    flat = indices.detach().reshape(-1).long()
    valid = (flat >= 0) & (flat < columns)
    order = torch.argsort(torch.where(valid, flat, columns), stable=True)
    kept = order[: int(valid.sum())]                 # (A,) slot ids, grouped by column in column order
    count = torch.bincount(flat[valid], minlength=columns)
    zero = [num_experts + i for i, kind in enumerate(null_columns) if kind == "zero"]
    dropped = int(tokens * k - valid.sum()) + sum(int(count[c]) for c in zero)
    shape = tuple(tokens_shape) if tokens_shape is not None and math.prod(tokens_shape) == tokens else (tokens,)
    return Routing(mode="token_choice", num_experts=num_experts, hole=False, logits=logits, noisy_logits=logits,
                   noise_std=None, probs=torch.softmax(logits, dim=-1), indices=indices.detach().clone(),
                   weights=weights.detach().clone(), token_index=torch.div(kept, k, rounding_mode="floor"),
                   expert_index=flat[kept], weight=weights.detach().reshape(-1)[kept].clone(), count=count,
                   tokens_shape=shape, dropped=torch.tensor(dropped), host_counts=tuple(count.tolist()),
                   null_columns=tuple(null_columns))


# ---------------------------------------------------------------------------------------------- finding layers
EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module called as ``experts(hidden_states, top_k_index,
    top_k_weights)``: its class or a base class is decorated with ``@use_experts_implementation``, or (older
    families such as DBRX) its ``forward`` takes exactly those three arguments."""
    for cls in type(module).__mro__:
        forward = cls.__dict__.get("forward")
        code = getattr(forward, "__code__", None)
        if getattr(forward, "__wrapped__", None) is not None and code is not None and \
                code.co_filename.replace("\\", "/").endswith("integrations/moe.py"):
            return True
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return tuple(params) == EXPERTS_ARGS


def _router_specs(model: nn.Module) -> List[Tuple[type, int]]:
    """(class, output index) of every module transformers records as ``router_logits`` in ``model`` (from the
    ``_can_record_outputs`` of its PreTrainedModels)."""
    specs = []
    for m in model.modules():
        table = getattr(m, "_can_record_outputs", None)
        if not isinstance(table, dict):
            continue
        spec = table.get("router_logits")
        for s in spec if isinstance(spec, (list, tuple)) else [spec] if spec is not None else []:
            target = getattr(s, "target_class", s)
            if inspect.isclass(target):
                specs.append((target, getattr(s, "index", 1)))  # a bare class: transformers reads index 1
    return specs


def _layer_id(name: str, fallback: int) -> int:
    """``model.layers.3.mlp`` → 3; the layer's ordinal where the name has no ``layers.<i>`` / ``blocks.<i>``."""
    found = re.findall(r"(?:^|\.)(?:layers|blocks|h|layer)\.(\d+)(?:\.|$)", name)
    return int(found[-1]) if found else fallback


@dataclass(frozen=True)
class HFLayerConfig:
    """What the plots read of a MoEBlock's config, for an :class:`HFMoELayer`: its null-expert columns."""

    null_columns: Tuple[str, ...] = ()


class HFMoELayer(LastRoutingViews):
    """One MoE layer of a transformers model, observed through hooks (see the module docstring).

    It answers what :class:`~moefy.observe.recorder.RoutingRecorder` and the plots read from a MoEBlock:
    ``routing`` (the record of the last call while watched, or None), ``num_experts``, ``num_columns``,
    ``null_columns`` (also as ``config.null_columns``), ``hole`` (False), ``layer_id``, ``route`` (``"tokens"``),
    ``moe_name`` and the views ``experts_load()`` / ``abs_experts_load()`` / ``routing_matrix``.

    Attributes:
        name: the MoE block's module name in the model.
        block: the MoE block module (the experts' parent).
        experts: the experts module (Doge's: its ``down_embed``; JetMoE's: its ``input_linear``).
        router: the module whose output holds the router logits (the block itself for Doge).
        reader: how the record is read (``"experts call"``, ``"llama4"``, ``"jetmoe"``, ``"doge"``,
            ``"longcat zero experts"``, ``"zaya skip expert"``).
        input_module: the module whose input gives the routed tokens' shape (B, L) (the block; JetMoE's
            attention experts are not called as a module: their attention layer).
    """

    route = "tokens"
    hole = False

    def __init__(self, name: str, block: nn.Module, experts: nn.Module, router: nn.Module,
                 router_index: int, num_experts: int, layer_id: int, reader: str,
                 null_columns: Tuple[str, ...] = (), input_module: Optional[nn.Module] = None):
        self.name, self.block, self.experts, self.router = name, block, experts, router
        self.input_module = block if input_module is None else input_module
        self.router_index, self.num_experts, self.layer_id = router_index, num_experts, layer_id
        self.reader, self.null_columns = reader, tuple(null_columns)
        self.config = HFLayerConfig(self.null_columns)
        self.routing: Optional[Routing] = None
        self._watchers: Dict[int, Callable[["HFMoELayer"], None]] = {}
        self._next_id = 0
        self._handles: list = []
        self._router_out = None
        self._tokens_shape: Optional[Tuple[int, ...]] = None

    @property
    def num_columns(self) -> int:
        return self.num_experts + len(self.null_columns)

    @property
    def moe_name(self) -> str:
        null = f" + {len(self.null_columns)} null experts" if self.null_columns else ""
        return f"layer {self.layer_id} / {type(self.block).__name__} ({self.num_experts} experts{null})"

    def __repr__(self) -> str:
        return f"HFMoELayer({self.name!r}, {self.moe_name}, reader={self.reader!r})"

    # -------------------------------------------------------------------------------------- watching
    def watch(self, callback: Callable[["HFMoELayer"], None]) -> "_Watch":
        """Call ``callback(layer)`` after each routing record of this layer (``layer.routing`` holds it). The
        hooks are installed with the first watcher and removed with the last; returns a handle with
        ``remove()``."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not self._watchers:
            self._install()
        self._next_id += 1
        self._watchers[self._next_id] = callback
        return _Watch(self, self._next_id)

    def unwatch(self, key: int) -> None:
        self._watchers.pop(key, None)
        if not self._watchers:
            for handle in self._handles:
                handle.remove()
            self._handles, self._router_out, self._tokens_shape = [], None, None

    def _emit(self, routing: Routing) -> None:
        self.routing, self._router_out = routing, None  # the router's output would keep its graph alive
        for callback in list(self._watchers.values()):
            callback(self)

    def _install(self) -> None:
        self._handles.append(self.input_module.register_forward_pre_hook(self._on_block_input, with_kwargs=True))
        install = _READERS[self.reader]
        self._handles.extend(install(self))

    def _on_block_input(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("layer_input"))
        self._tokens_shape = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
        self._router_out = None

    def _on_router_output(self, module, args, output) -> None:
        self._router_out = output

    def _router_logits(self, tokens: int) -> Optional[torch.Tensor]:
        """The (T, E') logits in the router's last output (None if it has none of that shape)."""
        out = self._router_out
        if isinstance(out, (tuple, list)):
            out = out[self.router_index] if len(out) > self.router_index else None
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        logits = out.reshape(-1, out.shape[-1])
        return logits if logits.shape == (tokens, self.num_columns) else None

    def _missing_logits(self, tokens: int) -> None:
        out = self._router_out
        what = "no router output" if out is None else f"router output {_describe(out)}"
        raise RuntimeError(f"{self.name}: cannot read the router logits ({what}; expected (T={tokens}, "
                           f"E'={self.num_columns}) at index {self.router_index}); the record would be incomplete")


class _Watch:
    """The handle :meth:`HFMoELayer.watch` returns."""

    def __init__(self, layer: HFMoELayer, key: int):
        self.layer, self.key = layer, key

    def remove(self) -> None:
        self.layer.unwatch(self.key)


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"tensor{tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return type(out).__name__


def _experts_args(args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) of an experts call, given by position or name; None if any
    is not a tensor."""
    values = list(args[:3]) + [kwargs.get(n) for n in EXPERTS_ARGS[len(args[:3]):]]
    return values if all(isinstance(v, torch.Tensor) for v in values) else None


# ---------------------------------------------------------------------------------------------- readers
def _on_experts_calls(layer: HFMoELayer, to_record: Callable[..., Routing]) -> list:
    """The hooks of a reader that records each experts call: ``to_record(index, weights, logits)`` turns the
    call's top_k_index (T, k) and top_k_weights (T, k), with the router logits (T, E'), into the record."""
    @torch.no_grad()
    def on_experts(module, args, kwargs):
        got = _experts_args(args, kwargs)
        if got is None:
            raise RuntimeError(f"{layer.name}: the experts were not called as experts(hidden_states, top_k_index, "
                               f"top_k_weights)")
        _, index, weights = got
        logits = layer._router_logits(index.shape[0])
        if logits is None:
            layer._missing_logits(index.shape[0])
        layer._emit(to_record(index, weights, logits))

    return [layer.router.register_forward_hook(layer._on_router_output),
            layer.experts.register_forward_pre_hook(on_experts, with_kwargs=True)]


def _as_the_experts_got(layer: HFMoELayer, index: torch.Tensor, weights: torch.Tensor,
                        logits: torch.Tensor) -> Routing:
    """The record of the experts call as it is: index (T, k), weights (T, k), the real experts' logits (T, E)."""
    return token_choice_routing(index, weights, logits[:, :layer.num_experts], layer.num_experts,
                                layer._tokens_shape)


def _experts_call(layer: HFMoELayer) -> list:
    """The common case: the record is the experts module's (top_k_index, top_k_weights)."""
    return _on_experts_calls(layer, lambda index, weights, logits: _as_the_experts_got(layer, index, weights, logits))


def _longcat(layer: HFMoELayer) -> list:
    """LongCat-Flash: the router's picks, zero experts as copy null columns; checked against the experts call."""
    def to_record(index, weights, logits):
        _, router_weights, router_index = layer._router_out
        zero = router_index >= layer.num_experts
        if torch.equal(torch.where(zero, index, router_index), index) and torch.equal(
                router_weights.masked_fill(zero, 0.0), weights):
            return token_choice_routing(router_index, router_weights, logits, layer.num_experts,
                                        layer._tokens_shape, layer.null_columns)
        # transformers changed how it hands zero experts over: record what the experts got
        _warn_once(layer, "the router's picks do not match the experts call; recording the experts call")
        return _as_the_experts_got(layer, index, weights, logits)

    return _on_experts_calls(layer, to_record)


def _zaya(layer: HFMoELayer) -> list:
    """Zaya: the skip expert (column E) as a zero null column. The router masks its picks to expert 0 with
    weight 0 before the experts see them; the picks are redone from the router logits as the router does
    (softmax, + balancing biases, top-k) and must reproduce the experts call exactly."""
    def to_record(index, weights, logits):
        probs = torch.softmax(logits, dim=-1)
        picks = torch.topk(probs.detach().float() + layer.router.balancing_biases, index.shape[1], dim=-1).indices
        picked = probs.gather(1, picks)
        skip = picks == layer.num_experts
        if torch.equal(picks.masked_fill(skip, 0), index) and torch.equal(picked.masked_fill(skip, 0).to(
                weights.dtype), weights):
            return token_choice_routing(picks, picked, logits, layer.num_experts, layer._tokens_shape,
                                        layer.null_columns)
        _warn_once(layer, "the redone router picks do not match the experts call; recording the experts call")
        return _as_the_experts_got(layer, index, weights, logits)

    return _on_experts_calls(layer, to_record)


def _llama4(layer: HFMoELayer) -> list:
    """Llama 4: the router returns (scores (T, E), logits (T, E)), scores = sigmoid of the top-k logits, 0 off
    them; the experts run on every token times its score. The record: the router's top-k of the logits (the
    same call as the router's) with their scores; checked: scattering them back gives the scores exactly."""
    @torch.no_grad()
    def on_router(module, args, output):
        scores, logits = output
        index = torch.topk(logits, module.top_k, dim=1).indices
        weights = scores.gather(1, index)
        if not torch.equal(torch.zeros_like(scores).scatter(1, index, weights), scores):
            _warn_once(layer, "the router's scores are not zero off its top-k of the logits; the record's "
                              "weights are the scores at that top-k")
        layer._emit(token_choice_routing(index, weights, logits, layer.num_experts, layer._tokens_shape))

    return [layer.router.register_forward_hook(on_router)]


def _jetmoe(layer: HFMoELayer) -> list:
    """JetMoE (MLP and attention experts): the router returns the experts' sorted slots (slot ids
    ``token·k + j``, their token ids, gates, tokens per expert) and the logits; the record is rebuilt from
    those slots exactly."""
    @torch.no_grad()
    def on_router(module, args, output):
        slots, _, gates, expert_size, logits = output
        k, tokens = module.top_k, logits.shape[0]
        experts = torch.repeat_interleave(torch.arange(len(expert_size), device=slots.device),
                                          torch.as_tensor(expert_size, device=slots.device))
        index = torch.empty(tokens * k, dtype=torch.long, device=slots.device).index_put_((slots,), experts)
        weights = torch.empty(tokens * k, dtype=gates.dtype, device=slots.device).index_put_((slots,), gates)
        layer._emit(token_choice_routing(index.view(tokens, k), weights.view(tokens, k), logits,
                                         layer.num_experts, layer._tokens_shape))

    return [layer.router.register_forward_hook(on_router)]


def _doge(layer: HFMoELayer) -> list:
    """Doge's CDMoE: product keys. The experts are two embeddings looked up with the picked indices (T, k);
    the weights are redone from the block's router logits (2, T, K) as the block does, and the per-expert
    logits are ``lx[i] + ly[j]`` for expert ``i·K + j``."""
    block = layer.block
    looked_up: list = []

    def on_lookup(module, args):
        looked_up[:] = [args[0].detach()]

    @torch.no_grad()
    def on_block(module, args, output):
        router_logits = output[1]                                      # (2, T, K)
        keys, top_k = block.num_keys, block.top_k
        (sx, sy), (ix, iy) = router_logits.topk(keys, dim=-1)
        all_scores = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2)
        all_index = (ix.unsqueeze(-1) * keys + iy.unsqueeze(-2)).flatten(-2)
        scores, position = all_scores.topk(top_k, dim=-1)
        index = all_index.gather(-1, position)
        weights = torch.softmax(scores, dim=-1)
        if block.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if looked_up and not torch.equal(looked_up[0], index):
            _warn_once(layer, "the redone picks differ from the experts' lookup; recording the lookup's indices")
            index = looked_up[0]
        looked_up.clear()
        tokens = index.shape[0]
        logits = router_logits.new_full((tokens, layer.num_experts), -math.inf)
        logits[:, : keys * keys] = (router_logits[0].unsqueeze(-1) + router_logits[1].unsqueeze(-2)).flatten(-2)
        layer._emit(token_choice_routing(index, weights, logits, layer.num_experts, layer._tokens_shape))

    return [layer.experts.register_forward_pre_hook(on_lookup), block.register_forward_hook(on_block)]


_READERS = {"experts call": _experts_call, "longcat zero experts": _longcat, "zaya skip expert": _zaya,
            "llama4": _llama4, "jetmoe": _jetmoe, "doge": _doge}
_WARNED: set = set()


def _warn_once(layer: HFMoELayer, message: str) -> None:
    key = (type(layer.block).__name__, message)
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s (%s): %s", layer.name, type(layer.block).__name__, message)


# ---------------------------------------------------------------------------------------------- discovery
def _special(name: str, block: nn.Module, layer_id: int, parent: nn.Module) -> Optional[HFMoELayer]:
    """The layers of the families with their own reader (by class name, checked by structure)."""
    cls = type(block).__name__
    if cls == "Llama4TextMoe" and hasattr(block, "router") and hasattr(block, "experts"):
        return HFMoELayer(name, block, block.experts, block.router, 1, block.num_experts, layer_id, "llama4")
    if cls in ("JetMoeMoE", "JetMoeMoA") and hasattr(block, "router"):
        return HFMoELayer(name, block, block.input_linear, block.router, 4, block.router.num_experts, layer_id,
                          "jetmoe", input_module=parent if cls == "JetMoeMoA" else block)
    if cls == "DogeCDMoE" and hasattr(block, "down_embed") and hasattr(block, "num_keys"):
        return HFMoELayer(name, block, block.down_embed, block, 1, block.num_experts, layer_id, "doge")
    return None


def hf_moe_layers(model: nn.Module, exclude: Sequence[nn.Module] = ()) -> Tuple[List[HFMoELayer], List[str]]:
    """Every MoE layer of a transformers model that can be observed, and the ones that cannot.

    Args:
        model: any module (a transformers model, or a part of one).
        exclude: modules whose submodules are not searched (e.g. moefy's own MoEBlocks).
    Returns:
        ``(layers, skipped)``: the :class:`HFMoELayer` of each MoE block in module order, and one line per
        experts module that was found but whose router could not be (``"name: why"``).
    """
    check_module(model, "model")
    skip = {id(m) for e in exclude for m in e.modules()}
    modules = dict(model.named_modules())
    specs = _router_specs(model)
    layers, skipped = [], []
    for name, module in modules.items():
        if id(module) in skip:
            continue
        special = _special(name, module, _layer_id(name, len(layers)), modules[name.rpartition(".")[0]])
        if special is not None:
            layers.append(special)
            skip.update(id(m) for m in module.modules())
            continue
        if not name or not is_hf_experts(module):
            continue
        block_name = name.rpartition(".")[0]
        block = modules[block_name]
        layer = _standard(block_name, block, module, specs, _layer_id(block_name, len(layers)))
        if isinstance(layer, str):
            skipped.append(f"{block_name}: {layer}")
            logger.warning("%s: %s; its routing is not recorded", block_name, layer)
        else:
            layers.append(layer)
    return layers, skipped


def _standard(name: str, block: nn.Module, experts: nn.Module, specs, layer_id: int):
    """The HFMoELayer of a block that calls its experts module; a string saying why not."""
    num_experts = getattr(experts, "num_experts", None)
    if not isinstance(num_experts, int):
        weight = getattr(experts, "gate_up_proj", getattr(experts, "down_proj", None))
        num_experts = weight.shape[0] if isinstance(weight, torch.Tensor) else None
    if not isinstance(num_experts, int) or num_experts < 1:
        return f"the experts module {type(experts).__name__} has no num_experts"
    router, index = None, 0
    for child_name, child in block.named_children():
        hit = next((i for cls, i in specs if isinstance(child, cls)), None)
        if hit is not None:
            router, index = child, hit
            break
    if router is None:  # no registry entry: the block's gate / router child, logits first in its output
        router = next((c for n, c in block.named_children() if n in ("gate", "router")), None)
    if router is None:
        return f"no router found beside {type(experts).__name__} (no child named gate / router)"
    cls = type(block).__name__
    if cls == "LongcatFlashMoE" and getattr(block, "zero_expert_num", 0):
        return HFMoELayer(name, block, experts, router, index, num_experts, layer_id, "longcat zero experts",
                          ("copy",) * block.zero_expert_num)
    if cls == "ZayaSparseMoeBlock" and hasattr(router, "balancing_biases"):
        return HFMoELayer(name, block, experts, router, index, num_experts, layer_id, "zaya skip expert",
                          ("zero",))
    return HFMoELayer(name, block, experts, router, index, num_experts, layer_id, "experts call")
