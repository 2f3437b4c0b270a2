"""moefy(): clone an existing module into a mixture of its copies (sparse upcycling), or convert chosen
submodules of a whole model in place, PEFT-style; ``merge`` / ``unmoefy`` go back to dense.

Every expert starts as a deep copy of the module (weights, buffers, requires_grad, train/eval state) and the
router is fresh. With the default routing (token choice, top-k weights renormalised to sum to one, no hole)
the mixture computes ``sum_i w_i f(x) = f(x)``: it equals the module at initialisation, up to float rounding.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..block import MoEBlock
from ..dispatch.fused import ELEMENTWISE

logger = logging.getLogger(__name__)

Target = Union[str, Sequence[str], Type[nn.Module], Tuple[Type[nn.Module], ...], Callable[[str, nn.Module], bool]]

_ELEMENTWISE = ELEMENTWISE + (nn.PReLU, nn.Dropout)  # position-wise, though not fusable
_POSITION_WISE = (nn.Linear, nn.LayerNorm, *_ELEMENTWISE) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _position_wise(module: nn.Module) -> bool:
    """Linear / norms / elementwise layers, or Sequentials of them: they act on each vector on its own."""
    if isinstance(module, nn.Sequential):
        return len(module) > 0 and all(_position_wise(m) for m in module)
    return isinstance(module, _POSITION_WISE)


_CHANNELS_FIRST = _CONV + (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _first_input_layer(module: nn.Module) -> Tuple[Optional[int], bool]:
    """``(feature size, channels first)`` of the first submodule (``module.modules()`` order) that declares
    its input features: Linear, conv, attention, RNN, norms."""
    for m in module.modules():
        for attr in ("in_features", "in_channels", "embed_dim", "input_size", "d_model", "num_features",
                     "num_channels"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr), isinstance(m, _CHANNELS_FIRST)
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return m.normalized_shape[0], False
    return None, False


def infer_routing(module: nn.Module) -> Tuple[str, Optional[int], int]:
    """``(route, input_dim, feature_dim)`` that keep ``module`` exact inside a mixture.

    Per token for a Linear or a Sequential of position-wise layers (Linear, norms, activations, dropout);
    per sample for everything else: convolutions (channels on dim 1), attention, and any other module, since
    a module that sees whole samples computes what it computed before whatever it does inside. Pass
    ``route="tokens"`` to ``moefy`` for a custom position-wise module (a SwiGLU FFN) to route per token.
    ``input_dim`` is the input size of the first layer that declares one (None if none does).
    """
    _check_module(module, "module")
    size, channels_first = _first_input_layer(module)
    if _position_wise(module):
        return "tokens", size, -1
    return "samples", size, 1 if channels_first else -1


def _check_module(value, name: str) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")


class _Shared:
    """A tensor every expert gets whole, even if its dim 0 happens to equal the batch size."""

    def __init__(self, value: torch.Tensor):
        self.value = value


class ModuleMixture(MoEBlock):
    """A mixture of ``num_experts`` deep copies of ``module`` with a fresh router (made by :func:`moefy`).

    It takes the module's inputs: ``x`` first, any other arguments after. With ``route="tokens"`` every
    vector of ``x`` (..., D) is routed, and side tensors whose leading shape equals ``x.shape[:-1]`` are
    sliced per token; with ``route="samples"`` every sample of ``x`` (B, ...) is routed whole and side
    tensors with dim 0 == B are sliced per sample. A module returning a tuple/list of tensors (each with
    the tokens / samples on dim 0) or ``None`` entries gets every tensor mixed with the same weights.

    Args:
        module: the module to copy; left untouched.
        num_experts: E ≥ 1 copies.
        k: experts per token (token choice), 1 ≤ k ≤ E (+1 with a hole).
        input_dim: D, the features the router reads; inferred from the module (``in_features``,
            ``in_channels``, ``embed_dim``, ...) when None.
        route, feature_dim: as in :class:`MoEBlock`; chosen by :func:`infer_routing` when None.
        expert_noise: breaks the symmetry of the copies: every floating parameter ``p`` of every expert gets
            ``N(0, (expert_noise * rms(p))^2)`` noise. 0 (default) keeps the mixture exact.
        **routing: any other :class:`MoEBlock` option (hole, noise, aux_criterion, normalize, ...).
    """

    def __init__(self, module: nn.Module, num_experts: int = 4, k: int = 1, input_dim: Optional[int] = None,
                 route: Optional[str] = None, feature_dim: Optional[int] = None, expert_noise: float = 0.0,
                 **routing):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, MoEBlock):
            raise TypeError(f"module is already a mixture ({type(module).__name__}); moefy its experts instead")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if isinstance(expert_noise, bool) or not isinstance(expert_noise, (int, float)) or not expert_noise >= 0:
            raise ValueError(f"expert_noise must be a number >= 0 (a relative std), got {expert_noise!r}")
        auto_route, auto_dim, auto_feature_dim = infer_routing(module)
        route = auto_route if route is None else route
        input_dim = auto_dim if input_dim is None else input_dim
        if input_dim is None:
            raise ValueError(f"input_dim: cannot infer the input feature size of {type(module).__name__}; "
                             f"pass input_dim=D (the size of the features the router should read)")
        if feature_dim is None:
            feature_dim = auto_feature_dim if route in ("samples", "images") else -1
        if route in ("samples", "images") and not isinstance(module, nn.MultiheadAttention):
            seq_first = [n or type(module).__name__ for n, m in module.named_modules()
                         if getattr(m, "batch_first", True) is False]
            if seq_first:
                raise ValueError(f"route='samples' needs the batch on dim 0, but {seq_first[0]} has "
                                 f"batch_first=False; build it with batch_first=True")
        experts = [copy.deepcopy(module) for _ in range(num_experts)]
        if expert_noise:
            with torch.no_grad():
                for expert in experts:
                    for p in expert.parameters():
                        if p.is_floating_point():
                            p.add_(torch.randn_like(p) * (expert_noise * p.detach().float().square().mean().sqrt()))
        super().__init__(experts=experts, input_dim=input_dim, k=k, route=route, feature_dim=feature_dim,
                         **routing)
        param = next(module.parameters(), None)
        if param is not None:
            self.router.to(param.device)
        self.training = module.training  # the experts keep their own (possibly mixed) train/eval flags
        self.router.train(module.training)
        self.expert_noise = float(expert_noise)
        self.conv_ndim = next((m.weight.dim() for m in [module] if isinstance(m, _CONV)), None)
        # For experts built from several sibling modules (moefy_chain): expert child name -> path of the module
        # it was copied from, relative to the module dense_root_depth levels above this mixture.
        # None: the expert is a copy of the module this mixture replaced.
        self.dense_sources: Optional[Dict[str, str]] = None
        self.dense_root_depth = 1
        self._out_struct = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The module's forward, mixed: ``x`` (..., D) per token or (B, ...) per sample → the module's output."""
        if self.conv_ndim is not None and isinstance(x, torch.Tensor) and x.dim() != self.conv_ndim:
            raise ValueError(f"x must be batched, shape (B, C, ...) with {self.conv_ndim} dims, got "
                             f"{tuple(x.shape)}: per-sample routing needs the batch dim")
        self._out_struct = None
        return self._unpack(super().forward(x, *args, **kwargs))

    @staticmethod
    def _side(v):
        return v.value if isinstance(v, _Shared) else v

    def expert_forward(self, expert: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run one copy on its rows ``x`` (n, ...) → (n, ...); tuple outputs are packed into (n, F)."""
        out = expert(x, *(self._side(a) for a in args), **{n: self._side(v) for n, v in kwargs.items()})
        return self._pack(out, x.shape[0])

    def _pack(self, out, n: int) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        if not isinstance(out, (tuple, list)):
            raise TypeError(
                f"{type(self.experts[0]).__name__} returned {type(out).__name__}: a mixture can only combine a "
                f"tensor, or a tuple/list of tensors (or None) with the tokens / samples on dim 0; subclass "
                f"ModuleMixture and override expert_forward to pick the tensor out")
        for i, o in enumerate(out):
            if o is not None and not (isinstance(o, torch.Tensor) and o.is_floating_point()
                                      and o.dim() > 0 and o.shape[0] == n):
                what = (f"shape {tuple(o.shape)}, dtype {o.dtype}" if isinstance(o, torch.Tensor)
                        else type(o).__name__)
                raise TypeError(
                    f"{type(self.experts[0]).__name__} returned a {type(out).__name__} whose item {i} is {what}: "
                    f"every item must be None or a floating tensor with the {n} routed rows on dim 0")
        tensors = [o for o in out if o is not None]
        if not tensors:
            raise TypeError(f"{type(self.experts[0]).__name__} returned no tensor to combine")
        self._out_struct = (type(out), [None if o is None else (o.shape[1:], o.dtype) for o in out])
        return torch.cat([o.reshape(n, -1).to(tensors[0].dtype) for o in tensors], dim=1)

    def _unpack(self, y: torch.Tensor):
        if self._out_struct is None:
            return y
        kind, items = self._out_struct
        self._out_struct = None
        lead = y.shape[:-1]
        parts = iter(y.split([math.prod(s) for s, _ in filter(None, items)], dim=-1))
        outs = [None if it is None else next(parts).reshape(*lead, *it[0]).to(it[1]) for it in items]
        return kind(*outs) if hasattr(kind, "_fields") else kind(outs)


_SAME_AS_QUERY, _SAME_AS_KEY = object(), object()


def _check_key_value(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mha: "AttentionMixture") -> None:
    """What nn.MultiheadAttention would otherwise assert deep inside, with the argument named."""
    b = 0 if mha.batch_first else 1
    if q.shape[-1] != mha.input_dim:
        raise ValueError(f"query must have embed_dim={mha.input_dim} features on its last dim, got shape "
                         f"{tuple(q.shape)}")
    for name, t, dim in (("key", k, mha.kdim), ("value", v, mha.vdim)):
        if t.shape[b] != q.shape[b] or t.shape[-1] != dim:
            raise ValueError(f"{name} must have query's batch size {q.shape[b]} on dim {b} and {dim} features on "
                             f"its last dim, got shape {tuple(t.shape)}")
    if k.shape[1 - b] != v.shape[1 - b]:
        raise ValueError(f"key and value must have the same length S on dim {1 - b}, got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


class AttentionMixture(ModuleMixture):
    """A mixture of copies of an ``nn.MultiheadAttention``, routed per sample.

    Takes MHA's arguments and returns ``(attn_output, attn_weights)`` like MHA: both are mixed with the same
    weights (``attn_weights`` is None when ``need_weights=False``). ``batch_first=False`` inputs (L, B, E)
    are handled (moved to batch-first for routing and back); a 3-D ``attn_mask`` (B·heads, L, S) is
    sliced per sample, a 2-D one (L, S) is shared. Unbatched (L, E) inputs are refused.
    """

    def __init__(self, module: nn.MultiheadAttention, num_experts: int = 4, k: int = 1, **options):
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        if options.pop("route", None) not in (None, "samples", "images"):
            raise ValueError("route: attention must be routed per sample (route='samples'), "
                             "a single token cannot attend to the others")
        options.setdefault("input_dim", module.embed_dim)
        super().__init__(module, num_experts, k, route="samples", feature_dim=-1, **options)
        self.batch_first, self.num_heads = module.batch_first, module.num_heads
        self.kdim, self.vdim = module.kdim, module.vdim
        self._signature = inspect.signature(type(module).forward)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        """Arguments of ``nn.MultiheadAttention.forward``; returns ``(attn_output, attn_weights)``."""
        bound = self._signature.bind(self, query, key, value, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop(next(iter(self._signature.parameters)))
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (q, k, v)):
            raise ValueError("query, key, value must be batched 3-D tensors: unbatched attention input has "
                             "no batch to route; add a batch dim")
        key_same, value_same = k is q, v is k
        _check_key_value(q, k, v, self)
        if not self.batch_first:
            q, k, v = q.movedim(1, 0), k.movedim(1, 0), v.movedim(1, 0)
        mask = a.get("attn_mask")
        if isinstance(mask, torch.Tensor):
            b, (lq, s) = q.shape[0], mask.shape[-2:]
            a["attn_mask"] = mask.reshape(b, self.num_heads, lq, s) if mask.dim() == 3 else _Shared(mask)
        a["key"] = _SAME_AS_QUERY if key_same else k
        a["value"] = _SAME_AS_KEY if value_same else v
        out, weights = super().forward(q, **a)
        return (out if self.batch_first else out.movedim(0, 1)), weights

    def expert_forward(self, expert: nn.Module, x: torch.Tensor, key=None, value=None, attn_mask=None,
                       **kwargs) -> torch.Tensor:
        n = x.shape[0]
        attn_mask = self._side(attn_mask)
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 4:
            attn_mask = attn_mask.reshape(n * self.num_heads, *attn_mask.shape[2:])
        if not self.batch_first:
            x = x.movedim(0, 1)
            key = key if key is _SAME_AS_QUERY else key.movedim(0, 1)
            value = value if value is _SAME_AS_KEY else value.movedim(0, 1)
        key = x if key is _SAME_AS_QUERY else key
        value = key if value is _SAME_AS_KEY else value
        out, weights = expert(x, key, value, attn_mask=attn_mask, **kwargs)
        return self._pack((out if self.batch_first else out.movedim(1, 0), weights), n)


# ---------------------------------------------------------------------- module / model conversion
def _mixture(module: nn.Module, **options) -> ModuleMixture:
    cls = AttentionMixture if isinstance(module, nn.MultiheadAttention) else ModuleMixture
    return cls(module, **options)


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
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def moefy(module: nn.Module, num_experts: int = 4, k: int = 1, *, target: Optional[Target] = None,
          **options) -> nn.Module:
    """Upcycle a module into a mixture of its copies, or every ``target`` submodule of a model in place.

    Args:
        module: without ``target``, the module to clone (left untouched); with ``target``, the model whose
            matching submodules are replaced in place.
        num_experts: E ≥ 1 experts per mixture.
        k: experts per token, 1 ≤ k ≤ E.
        target: which submodules to convert: a name pattern or a list of them (``"intermediate"`` matches
            every module whose dotted name ends with that component path; ``*`` matches within a component,
            ``**`` across components), an ``nn.Module`` type or tuple of types, or a predicate
            ``(name, module) -> bool``. The outermost match wins; the model itself is never a target.
        **options: ``route``, ``input_dim``, ``feature_dim``, ``expert_noise`` (see :class:`ModuleMixture`)
            and every :class:`MoEBlock` routing option. Without ``route`` each match gets its own
            (:func:`infer_routing`): per token for Linear / MLP, per sample for conv, attention and the rest.
            Without ``layer_id`` the mixtures of a model are numbered 0, 1, ... in module order.

    Returns:
        the mixture (no ``target``) or ``module`` itself, converted (with ``target``).
    Raises:
        ValueError: bad ``num_experts`` / ``k``, or ``target`` matches nothing.
    """
    if target is None:
        return _mixture(module, num_experts=num_experts, k=k, **options)
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
    for i, name in enumerate(names):
        opts = dict(options)
        opts.setdefault("layer_id", i)
        try:
            mixture = _mixture(module.get_submodule(name), num_experts=num_experts, k=k, **opts)
        except (TypeError, ValueError) as err:
            raise type(err)(f"moefy target {name!r}: {err}") from err
        _set_submodule(module, name, mixture)
        logger.info("moefy: %s -> %d experts, k=%d, route=%s", name, num_experts, k, mixture.route)
    return module


def moefy_chain(parent: nn.Module, names: Sequence[str], num_experts: int = 4, k: int = 1,
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
    mixture = _mixture(nn.Sequential(*parts), num_experts=num_experts, k=k, **options)
    mixture.dense_sources = {str(i): name for i, name in enumerate(names)}
    mixture.dense_root_depth = len(names[0].split("."))
    _set_submodule(parent, names[0], mixture)
    for name in names[1:]:
        _set_submodule(parent, name, nn.Identity())
    return mixture


# ---------------------------------------------------------------------- back to dense
def merge(mixture: MoEBlock, how: Union[str, int, Sequence[float], torch.Tensor] = "mean") -> nn.Module:
    """One dense module from a mixture of same-shaped experts.

    Args:
        mixture: a mixture whose experts share parameter names and shapes (any :func:`moefy` mixture).
        how: ``"mean"`` averages every floating parameter and buffer over the experts; an int picks that
            expert; a sequence / tensor of E non-negative weights takes the weighted average (e.g. the
            experts' token counts). Integer buffers come from expert 0.
    Returns:
        a new module (a deep copy), the type of the experts.
    """
    if not isinstance(mixture, MoEBlock):
        raise TypeError(f"mixture must be a MoEBlock, got {type(mixture).__name__}")
    experts, num = list(mixture.experts), mixture.num_experts
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
    _check_module(model, "model")
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
    return model


# ---------------------------------------------------------------------- checkpoints
def dense_key_map(model: nn.Module) -> Dict[str, Optional[str]]:
    """For every key of ``model.state_dict()``: the key of the dense (pre-moefy) model it comes from.

    Expert keys ``<mixture>.experts.<e>.<rest>`` map to ``<mixture>.<rest>`` (or, for :func:`moefy_chain`
    mixtures, to the key of the module the part was copied from); router keys map to None.
    """
    _check_module(model, "model")
    mixtures = {n: m for n, m in model.named_modules() if isinstance(m, ModuleMixture)}
    mapping: Dict[str, Optional[str]] = {}
    for key in model.state_dict():
        owner = max((n for n in mixtures if n == "" or key.startswith(n + ".")), key=len, default=None)
        if owner is None:
            mapping[key] = key
            continue
        mixture, prefix = mixtures[owner], owner + "." if owner else ""
        rest = key[len(prefix):]
        if not rest.startswith("experts."):
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
