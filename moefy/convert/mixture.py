"""ModuleMixture / AttentionMixture: a mixture of deep copies of one module with a fresh router, and
:func:`infer_routing` (:mod:`moefy.convert.routes`) picks per-token or per-sample routing that keeps it exact.

Every expert starts as a deep copy of the module (weights, buffers, requires_grad, train/eval state) and the
router is fresh. With the default routing (token choice, top-k weights renormalised to sum to one, no hole)
the mixture computes ``sum_i w_i f(x) = f(x)``: it equals the module at initialisation, up to float rounding.
With ``num_shared = S`` shared copies it computes ``routed_scaling_factor · f(x) + S · f(x)`` (no shared gate):
not the module, and moefy does not rescale the copies to hide that (see the README, "Shared experts").
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_int, check_number
from ..config import ROUTE_ALIASES, RoutingConfig
from .granular import copy_router_rows, exactness, upcycled_experts
from .routes import _CONV, explain_routing, infer_routing  # noqa: F401 (infer_routing: its old home)
from .sources import expert_copies, num_experts_for


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
        num_experts: E ≥ 1 copies; default 4, or ``len(experts_from)`` (which it must then equal).
        k: experts per token (token choice), 1 ≤ k ≤ E (+1 with a hole); default ``config.k`` (1).
        input_dim: D, the features the router reads; inferred from the module (``in_features``,
            ``in_channels``, ``embed_dim``, ...) when None.
        route, feature_dim: as in :class:`~moefy.config.RoutingConfig`; chosen by :func:`infer_routing` unless
            given here or set to a non-default value in ``config`` (``route_reason`` says why, ``route_unsure``
            is True where the module could not be classified and routes per sample).
        expert_noise: breaks the symmetry of the copies: every floating parameter ``p`` of every expert gets
            ``N(0, (expert_noise * rms(p))^2)`` noise. 0 (default) keeps the mixture exact.
        granularity: G ≥ 1: with G > 1 every expert is one of G slices of the module's H hidden neurons
            (fine-grained upcycling, :mod:`moefy.convert.granular`: expert ``c·G + g`` is slice g of copy c,
            down weights × G, router rows copied across the slices of a copy); exact with ``k`` a multiple
            of G (``exact_at_init`` says whether it is). E must be a multiple of G, H too.
        split: how the hidden neurons are cut into the G slices: ``"contiguous"``, ``"random"``, ``"clustered"``.
        drop_fraction: r in [0, 1]: drop-upcycling (:mod:`moefy.convert.drop_upcycling`) re-initialises
            round(r·H) hidden neurons of every expert from the dense weights' statistics (0: none).
        num_shared: S ≥ 0 more copies as shared experts (:mod:`moefy.dispatch.shared`), run on every routed
            row and added to the routed mixture; they get no ``expert_noise``. With S > 0 the mixture starts
            at ``(routed_scaling_factor + S) · f(x)`` (with ``normalize``, no shared gate), not at ``f(x)``.
        experts_from: expert i is a deep copy of ``experts_from[i]`` instead of ``module`` (Branch-Train-MiX,
            :mod:`moefy.convert.sources`); each must have ``module``'s parameter names and shapes.
        config: a :class:`~moefy.config.RoutingConfig`; ``**options`` (any of its fields: hole, noise,
            aux_criterion, normalize, ...) build one or replace its fields.
    """

    def __init__(self, module: nn.Module, num_experts: Optional[int] = None, k: Optional[int] = None,
                 input_dim: Optional[int] = None, route: Optional[str] = None, feature_dim: Optional[int] = None,
                 expert_noise: float = 0.0, config: Optional[RoutingConfig] = None, num_shared: int = 0,
                 experts_from: Optional[Sequence[nn.Module]] = None, granularity: int = 1,
                 split: str = "contiguous", drop_fraction: float = 0.0, **options):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, MoEBlock):
            raise TypeError(f"module is already a mixture ({type(module).__name__}); moefy its experts instead")
        num_experts = num_experts_for(num_experts, experts_from)
        check_int(num_experts, "num_experts", min=1, what="an int >= 1")
        check_number(expert_noise, "expert_noise", low=0, what="a number >= 0 (a relative std)")
        check_int(num_shared, "num_shared", min=0)
        base = RoutingConfig.from_options(config, **options)
        given = route if route is not None else (base.route if base.route != "tokens" else None)
        auto = explain_routing(module, route=given, input_dim=input_dim)  # probes the module only when it has to pick the route
        route = ROUTE_ALIASES.get(auto.route, auto.route)
        auto_dim, auto_feature_dim = auto.input_dim, auto.feature_dim
        input_dim = auto_dim if input_dim is None else input_dim
        if input_dim is None:
            raise ValueError(f"input_dim: cannot infer the input feature size of {type(module).__name__}; "
                             f"pass input_dim=D (the size of the features the router should read)")
        if feature_dim is None:
            feature_dim = base.feature_dim if base.feature_dim != -1 else \
                (auto_feature_dim if route == "samples" else -1)
        if route == "samples" and not isinstance(module, nn.MultiheadAttention):
            seq_first = [n or type(module).__name__ for n, m in module.named_modules()
                         if getattr(m, "batch_first", True) is False]
            if seq_first:
                raise ValueError(f"route='samples' needs the batch on dim 0, but {seq_first[0]} has "
                                 f"batch_first=False; build it with batch_first=True")
        if experts_from is not None and (granularity != 1 or drop_fraction):
            raise ValueError("experts_from: granularity and drop_fraction cut or re-initialise copies of one module; "
                             "with experts_from, leave them at 1 and 0")
        experts = expert_copies(module, num_experts, experts_from) if experts_from is not None else \
            upcycled_experts(module, num_experts, granularity, split, drop_fraction)  # copies / slices
        shared = [copy.deepcopy(module) for _ in range(num_shared)] or None
        if expert_noise:
            with torch.no_grad():
                for expert in experts:
                    for p in expert.parameters():
                        if p.is_floating_point():
                            p.add_(torch.randn_like(p) * (expert_noise * p.detach().float().square().mean().sqrt()))
        fields = {"k": k} if k is not None else {}
        super().__init__(experts=experts, input_dim=input_dim, config=base, route=route, feature_dim=feature_dim,
                         shared_experts=shared, **fields)
        param = next(module.parameters(), None)
        if param is not None:
            self.router.to(param.device)
            if self.shared_expert_gate is not None:
                self.shared_expert_gate.to(param.device, param.dtype if param.is_floating_point() else None)
        self.training = module.training  # the experts keep their own (possibly mixed) train/eval flags
        self.router.train(module.training)
        self.expert_noise = float(expert_noise)
        self.granularity, self.split, self.drop_fraction = granularity, split, float(drop_fraction)
        if granularity > 1:
            copy_router_rows(self.router, num_experts, granularity)
        self.route_reason, self.route_unsure = auto.reason, auto.unsure  # why this route (logged by moefy())
        self.conv_ndim = next((m.weight.dim() for m in [module] if isinstance(m, _CONV)), None)
        # For experts built from several sibling modules (moefy_chain): expert child name -> path of the module
        # it was copied from, relative to the module dense_root_depth levels above this mixture.
        # None: the expert is a copy of the module this mixture replaced.
        self.dense_sources: Optional[Dict[str, str]] = None
        self.dense_root_depth = 1
        self._out_struct = None

    @property
    def exact_at_init(self) -> bool:
        """Whether the mixture now meets the condition under which it computes the module it was made from
        (:func:`moefy.convert.granular.exactness`; ``exactness_reason`` says what breaks it)."""
        return exactness(self)[0]

    @property
    def exactness_reason(self) -> str:
        return exactness(self)[1]

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

    def __init__(self, module: nn.MultiheadAttention, num_experts: int = 4, k: Optional[int] = None, **options):
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        if ROUTE_ALIASES.get(options.get("route"), options.pop("route", None)) not in (None, "samples"):
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
