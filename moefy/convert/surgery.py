"""moefy(): clone an existing module into a mixture of its copies (sparse upcycling), or convert chosen
submodules of a whole model in place, PEFT-style (target matching by name pattern, type or predicate);
:func:`moefy_chain` makes one expert of several sibling modules.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional, Sequence, Tuple, Type, Union

from torch import nn

from ..block import MoEBlock
from .mixture import AttentionMixture, ModuleMixture, _check_module
from .router_init import check_router_init, init_router
from .sources import check_rest, model_sources
from .torch_layers import check_target, sync_fast_paths
from .writer import keep_save_pretrained

logger = logging.getLogger(__name__)

Target = Union[str, Sequence[str], Type[nn.Module], Tuple[Type[nn.Module], ...], Callable[[str, nn.Module], bool]]


def _mixture(module: nn.Module, name: Optional[str] = None, **options) -> ModuleMixture:
    """The mixture of ``module``; logs (``moefy`` logger) the route it got and why, and warns where moefy
    could not classify the module and routed it per sample."""
    cls = AttentionMixture if isinstance(module, nn.MultiheadAttention) else ModuleMixture
    mixture = cls(module, **options)
    label = f"{name} ({type(module).__name__})" if name else type(module).__name__
    logger.info("moefy: %s -> %d experts, k=%d, route=%s (%s)", label, len(mixture.experts), mixture.k,
                mixture.route, mixture.route_reason)
    if mixture.granularity > 1 and not mixture.exact_at_init:
        logger.warning("moefy: %s (granularity=%d) is not the dense module at init: %s", label,
                       mixture.granularity, mixture.exactness_reason)
    if mixture.route_unsure:
        logger.warning("moefy: %s routes per sample (whole sequences to one expert): %s. If it is position-wise "
                       "(an FFN), pass route=\"tokens\" to moefy() to route every token", label, mixture.route_reason)
    return mixture


def _glob_regex(pattern: str) -> "re.Pattern":
    """``*`` matches inside one name component, ``**`` across dots; a pattern also matches any suffix of
    the dotted module name that starts at a component (``"output.dense"`` matches ``"layer.0.output.dense"``)."""
    body = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", r"[^.]*").replace(r"\?", r"[^.]")
    return re.compile(r"(?:.*\.)?" + body.replace("\0", ".*"))


def _matcher(target: Target) -> Callable[[str, nn.Module], bool]:
    if isinstance(target, str):
        target = [target]
    if isinstance(target, type) or (isinstance(target, tuple) and target and
                                    all(isinstance(t, type) for t in target)):
        if not all(issubclass(t, nn.Module) for t in (target if isinstance(target, tuple) else (target,))):
            raise TypeError(f"target: module types must subclass nn.Module, got {target!r}")
        return lambda name, m: isinstance(m, target)
    if callable(target):
        return lambda name, m: bool(target(name, m))
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        regexes = [_glob_regex(t) for t in target]
        return lambda name, m: any(r.fullmatch(name) for r in regexes)
    raise TypeError("target must be a name pattern, a list of name patterns, an nn.Module type (or tuple "
                    f"of types), or a predicate (name, module) -> bool; got {target!r}")


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """``root.<path> = new``; torch layers around it switch their fused fast path off while they hold a mixture
    (:mod:`moefy.convert.torch_layers`), and a mixture where torch reads the weights directly is refused."""
    if isinstance(new, MoEBlock):
        check_target(root, path)
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
    sync_fast_paths(root, path)


def moefy(module: nn.Module, num_experts: Optional[int] = None, k: Optional[int] = None, *,
          target: Optional[Target] = None, experts_from: Optional[Sequence[nn.Module]] = None, rest: str = "base",
          router_init: Optional[str] = None, router_data=None, **options) -> nn.Module:
    """Upcycle a module into a mixture of its copies, or every ``target`` submodule of a model in place.

    Args:
        module: without ``target``, the module to clone (left untouched); with ``target``, the model whose
            matching submodules are replaced in place.
        num_experts: E ≥ 1 experts per mixture; default 4, or ``len(experts_from)``.
        k: experts per token, 1 ≤ k ≤ E; default ``config.k`` (1).
        target: which submodules to convert: a name pattern or a list of them (``"intermediate"`` matches
            every module whose dotted name ends with that component path; ``*`` matches within a component,
            ``**`` across components), an ``nn.Module`` type or tuple of types, or a predicate
            ``(name, module) -> bool``. The outermost match wins; the model itself is never a target.
        experts_from: expert i is a copy of ``experts_from[i]`` (without ``target``: modules shaped like
            ``module``; with it: models of ``module``'s architecture, expert i of the mixture at path ``p`` a copy of
            ``experts_from[i].get_submodule(p)``): Branch-Train-MiX / mergekit-moe, :mod:`moefy.convert.sources`.
        rest: with ``target`` and ``experts_from``, what the model is outside the targets: ``"base"`` keeps
            ``module``'s own weights; ``"average"`` overwrites them (in place) with the element-wise mean of the
            ``experts_from`` models' weights. Logged.
        router_init, router_data: ``"mean"`` or ``"kmeans"``: after the conversion, set every router's rows
            from ``router_data`` with :func:`~moefy.convert.router_init.init_router` (see there for the data).
        **options: ``route``, ``input_dim``, ``feature_dim``, ``expert_noise``, ``granularity``, ``split``,
            ``drop_fraction``, ``config`` (see
            :class:`ModuleMixture`) and every :class:`~moefy.config.RoutingConfig` field. Without ``route`` each match gets its own
            (:func:`infer_routing`): per token for Linear, MLPs and position-wise FFNs (probed; HF LlamaMLP,
            GPT2MLP, BertIntermediate ...), per sample for conv, attention and what mixes positions; logged.
            Without ``layer_id`` the mixtures of a model are numbered 0, 1, ... in module order.

    Returns:
        the mixture (no ``target``) or ``module`` itself, converted (with ``target``).
    Raises:
        ValueError: bad ``num_experts`` / ``k``, or ``target`` matches nothing.
    """
    check_rest(rest, target, experts_from, num_experts)
    check_router_init(router_init, router_data)
    if target is None:
        mixture = _mixture(module, num_experts=num_experts, k=k, experts_from=experts_from, **options)
        if router_init is not None:
            init_router(mixture, router_data, router_init)
        return mixture
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    match, names, skip = _matcher(target), [], []
    for name, m in module.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, MoEBlock):
            skip.append(name)
        elif match(name, m):
            names.append(name)
            skip.append(name)
    if not names:
        some = [n for n, _ in module.named_modules() if n][:12]
        raise ValueError(f"target {target!r} matched no submodule of {type(module).__name__}; "
                         f"module names look like {some}")
    for name in names:  # before any conversion: a refused target leaves the model as it was
        check_target(module, name)
    sources = model_sources(module, names, experts_from, rest) if experts_from is not None else {}
    for i, name in enumerate(names):
        opts = dict(options)
        if getattr(options.get("config"), "layer_id", None) is None:
            opts.setdefault("layer_id", i)
        try:
            mixture = _mixture(module.get_submodule(name), name, num_experts=num_experts, k=k,
                               experts_from=sources.get(name), **opts)
        except (TypeError, ValueError) as err:
            raise type(err)(f"moefy target {name!r}: {err}") from err
        _set_submodule(module, name, mixture)
    if router_init is not None:
        init_router(module, router_data, router_init, layerwise=experts_from is not None)  # see router_init.py
    keep_save_pretrained(module)
    return module


def moefy_chain(parent: nn.Module, names: Sequence[str], num_experts: int = 4, k: Optional[int] = None,
                **options) -> ModuleMixture:
    """Upcycle sibling modules that run one after the other as ONE expert with one router.

    ``parent.<names[0]>`` becomes a mixture of copies of ``nn.Sequential(names[0], names[1], ...)`` and the
    other names become ``nn.Identity``. Exact only where ``parent`` computes ``names[-1](...(names[0](x)))``
    with nothing between them (in BERT, ``intermediate`` then ``output.dense``: dropout, residual and norm
    come after). :func:`load_dense_state_dict` and :func:`unmoefy` know where each part came from.

    Returns:
        the new mixture (already in place).
    """
    _check_module(parent, "parent")
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) < 1:
        raise ValueError(f"names must be a non-empty list of submodule paths, got {names!r}")
    parts = []
    for name in names:
        try:
            parts.append(parent.get_submodule(name))
        except AttributeError as err:
            raise ValueError(f"names: {type(parent).__name__} has no submodule {name!r}") from err
    mixture = _mixture(nn.Sequential(*parts), "+".join(names), num_experts=num_experts, k=k, **options)
    mixture.dense_sources = {str(i): name for i, name in enumerate(names)}
    mixture.dense_root_depth = len(names[0].split("."))
    _set_submodule(parent, names[0], mixture)
    for name in names[1:]:
        _set_submodule(parent, name, nn.Identity())
    return mixture
