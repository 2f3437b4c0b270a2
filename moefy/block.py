"""MoEBlock: the abstract mixture. Subclasses define experts and ``expert_forward``; the block routes.

forward = route → dispatch → experts → combine (see :mod:`moefy.routing` and :mod:`moefy.dispatch`).
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from einops import reduce
from torch import nn

from .dispatch.combine import AGGREGATIONS, dispatch_combine
from .dispatch.fused import fused_layout
from .routing.losses import AUX_LOSSES
from .routing.record import Routing
from .routing.router import Router
from .routing.select import count_ids, expert_capacity, expert_choice, token_choice

ROUTES = ("tokens", "samples")
AuxCriterion = Union[None, str, Sequence[str], Mapping[str, float]]
_NO_DROPS = torch.zeros((), dtype=torch.long)  # shared: a new tensor per forward costs ~5 µs at batch size 1


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling is not None and is_compiling())


def _parse_aux(aux_criterion: AuxCriterion) -> Dict[str, float]:
    if aux_criterion is None or aux_criterion == "none":
        return {}
    if isinstance(aux_criterion, str):
        aux_criterion = {aux_criterion: 1.0}
    elif isinstance(aux_criterion, (list, tuple)):
        aux_criterion = {name: 1.0 for name in aux_criterion}
    elif not isinstance(aux_criterion, Mapping):
        raise ValueError(f"aux_criterion must be None, a loss name, a list of names or {{name: coefficient}}, "
                         f"got {aux_criterion!r}")
    for name, coef in aux_criterion.items():
        if name not in AUX_LOSSES:
            raise ValueError(f"aux_criterion: unknown loss {name!r}; allowed: {sorted(AUX_LOSSES)}")
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
            raise ValueError(f"aux_criterion: coefficient of {name!r} must be a number >= 0, got {coef!r}")
    return {name: float(coef) for name, coef in aux_criterion.items()}


class _Rows:
    """A side input flattened to one row per routed token / sample."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows


class MoEBlock(nn.Module, ABC):
    """A mixture of experts over any expert modules.

    Subclass it: build the experts, pass them to ``super().__init__(experts=..., input_dim=..., **routing)``
    and override :meth:`expert_forward`.

    Args:
        experts: E expert modules (a list or ``nn.ModuleList``).
        input_dim: D, the feature size the router reads.
        k: token choice: experts per token, 1 ≤ k ≤ E'; expert choice: average experts per token used in
            the capacity ``C = ceil(capacity_factor · T · k / E')``.
        hole: add a router column E whose tokens are dropped (zero output) and counted in ``dropped``.
        noise: None, ``"gumbel"``, ``"gaussian"`` (learned std) or ``"jitter"``; training only.
        aux_criterion: None, a loss name, a list of names or ``{name: coefficient}``; names in
            :data:`moefy.routing.losses.AUX_LOSSES`.
        aggregation: ``"sum"`` or ``"mean"`` of the weighted expert outputs of a token.
        expert_choice: experts pick their top-C tokens instead of tokens picking top-k experts.
        route: ``"tokens"`` routes every vector of ``x`` (..., D); ``"samples"`` routes every sample of
            ``x`` (B, ...) as a whole (for attention or conv experts), using its mean feature vector.
        layer_id: the block's position in a bigger model, for plots and logs.
        capacity_factor, capacity: expert choice capacity (an explicit ``capacity`` wins).
        normalize: token choice: renormalise the top-k weights to sum to one (default); False keeps the
            raw scores, as the original MoEfy did.
        temperature: router logits are divided by it.
        score_func: ``"softmax"`` or ``"sigmoid"`` router scores.
        feature_dim: with ``route="samples"``, the dim of ``x`` that holds the D features (1 for NCHW).
        num_experts: optional check that ``len(experts)`` is what the caller expects.
        fused: run the experts as one pass per layer over stacked weights (:mod:`moefy.dispatch.fused`) instead of
            one ``expert_forward`` call each. Only for experts that are identical plain ``nn.Linear`` or
            ``nn.Sequential(Linear, activation, ..., Linear)`` and an ``expert_forward`` that is just
            ``expert(x)``; other experts raise ValueError. Same outputs and gradients as unfused (to float
            rounding); calls with extra forward arguments, and dispatch overrides, run unfused.
    """

    def __init__(self, experts: Iterable[nn.Module], input_dim: int, k: float = 1, hole: bool = False,
                 noise: Optional[str] = None, aux_criterion: AuxCriterion = None, aggregation: str = "sum",
                 expert_choice: bool = False, route: str = "tokens", layer_id: Optional[int] = None,
                 capacity_factor: float = 1.0, capacity: Optional[int] = None, normalize: bool = True,
                 temperature: float = 1.0, score_func: str = "softmax", feature_dim: int = -1,
                 num_experts: Optional[int] = None, fused: bool = False, **unknown):
        super().__init__()
        if unknown:
            allowed = [p for p in inspect.signature(MoEBlock.__init__).parameters if p not in ("self", "unknown")]
            raise TypeError(f"MoEBlock got unknown option(s) {sorted(unknown)}; allowed: {allowed}")
        if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList) or not isinstance(
                experts, Iterable):
            raise TypeError(f"experts must be a non-empty list of nn.Module, got {type(experts).__name__}")
        experts = list(experts) if not isinstance(experts, nn.ModuleList) else experts
        if len(experts) == 0 or not all(isinstance(e, nn.Module) for e in experts):
            raise TypeError("experts must be a non-empty list of nn.Module")
        if num_experts is not None and num_experts != len(experts):
            raise ValueError(f"num_experts={num_experts} but {len(experts)} experts were given")
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        num_columns = len(experts) + int(bool(hole))
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= num_columns:
            raise ValueError(f"k must be a number in [1, {num_columns}] (the number of experts"
                             f"{' + hole' if hole else ''}), got {k!r}")
        if not expert_choice and int(k) != k:
            raise ValueError(f"k must be an int for token choice, got {k!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        route = "samples" if route == "images" else route  # the original MoEfy's name
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        for flag, value in (("hole", hole), ("expert_choice", expert_choice), ("normalize", normalize)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or \
                not 0 < capacity_factor < math.inf:
            raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
            raise TypeError(f"feature_dim must be an int (a dim of x), got {feature_dim!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        self._fused_layout = fused_layout(experts) if fused else None
        if fused and self._fused_layout is None:
            raise ValueError("fused=True needs identical experts, each a plain nn.Linear or an nn.Sequential of "
                             "nn.Linear layers and elementwise activations (same shapes, no hooks); "
                             "use fused=False for these experts")
        self.aux_weights = _parse_aux(aux_criterion)
        if "prob" in self.aux_weights and (noise != "gaussian" or expert_choice):
            raise ValueError("aux_criterion 'prob' is Shazeer's smooth load estimator: it needs "
                             "noise='gaussian' and token choice (expert_choice=False)")

        self.router = Router(input_dim, num_columns, noise=noise, temperature=temperature, score_func=score_func)
        self.experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList(experts)
        self.input_dim, self.num_experts, self.num_columns = input_dim, len(experts), num_columns
        self.k = int(k) if not expert_choice else k
        self.hole, self.noise, self.aggregation = bool(hole), self.router.noise, aggregation
        self.expert_choice, self.route, self.layer_id = bool(expert_choice), route, layer_id
        self.capacity_factor, self.capacity, self.normalize = capacity_factor, capacity, bool(normalize)
        self.feature_dim = feature_dim
        self.aux_criterion = aux_criterion
        self.routing: Optional[Routing] = None
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.aux_loss = torch.zeros(())
        for i, expert in enumerate(self.experts):
            expert.expert_id = i
            expert.mixture_id = self.moe_name

    # the last forward's record: a view of one call (holding its autograd graph), not state of the block
    _LAST_FORWARD = ("routing", "aux_losses", "aux_loss")

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, ``pickle``) start as if no forward had run: the last forward's routing
        record and aux losses hold that call's graph, which cannot be deep-copied and is not the block's."""
        state = super().__getstate__()
        state.update(routing=None, aux_losses={}, aux_loss=torch.zeros(()))
        for name in self._LAST_FORWARD[3:]:
            state[name] = None
        return state

    @abstractmethod
    def expert_forward(self, expert: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run one expert on its tokens: ``x`` (n, *F) → (n, *F_out), one output row per input row.

        ``args`` / ``kwargs`` are the extra arguments given to ``forward``; every tensor among them whose
        leading dims are the routed shape (``x.shape[:-1]`` per token, (B,) per sample) arrives sliced to
        this expert's rows.
        """

    # ------------------------------------------------------------------ pipeline
    def forward(self, x: torch.Tensor, *args, token_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``x``: (..., D) with ``route="tokens"``, (B, ...) with ``route="samples"`` → (..., D_out) / (B, ...).

        ``token_mask``: optional bool tensor of shape ``x.shape[:-1]`` (tokens) or (B,) (samples), True for
        real tokens. Masked tokens (padding) are not routed: their output is zero and they count in no load,
        dropped total, aux loss or statistic.

        Extra ``args`` / ``kwargs`` go to :meth:`expert_forward`: tensors among them whose leading dims are
        the routed shape (``x.shape[:-1]`` per token, (B,) per sample) are sliced per row like ``x``;
        everything else is passed unchanged.
        """
        rows, router_in, tokens_shape = self._as_rows(x)
        kept = None
        if token_mask is not None:
            kept = self._kept_rows(token_mask, tokens_shape)
            router_in = router_in.index_select(0, kept)
        routing = self.route_rows(router_in, tokens_shape, kept)
        run = self._side_input_runner(tokens_shape, args, kwargs) if args or kwargs else None
        y = self.dispatch(rows, routing, run)
        if self.route == "tokens" and len(tokens_shape) != 1:
            y = y.reshape(*tokens_shape, *y.shape[1:])
        self.__dict__["routing"] = routing  # a plain attribute: skip nn.Module.__setattr__'s checks (µs per call)
        self.set_aux_losses(routing)
        return y

    def set_aux_losses(self, routing: Routing) -> None:
        """Compute ``aux_losses`` (name → scalar) and their weighted sum ``aux_loss`` from ``routing``."""
        if self.aux_weights:
            self.aux_losses = {name: AUX_LOSSES[name](routing) for name in self.aux_weights}
            self.aux_loss = sum((c * self.aux_losses[n] for n, c in self.aux_weights.items()),
                                routing.logits.new_zeros(()))
        else:  # no loss: keep one zero per dtype / device instead of a new tensor every call, except under
            # torch.compile, where reading the last call's tensor would read a CUDA graph's recycled output
            zero = self.aux_loss
            if _compiling() or zero.dtype != routing.logits.dtype or zero.device != routing.logits.device or \
                    zero.requires_grad:
                self.aux_loss = routing.logits.new_zeros(())

    def _as_rows(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if self.route == "tokens":
            if x.dim() == 0 or x.shape[-1] != self.input_dim:
                raise ValueError(f"x must have shape (..., input_dim={self.input_dim}), got {tuple(x.shape)}")
            rows = x.reshape(-1, self.input_dim)
            return rows, rows, tuple(x.shape[:-1])
        if not -x.dim() <= self.feature_dim < x.dim():
            raise ValueError(f"feature_dim={self.feature_dim} is not a dim of x with shape {tuple(x.shape)}")
        if x.dim() < 2 or x.shape[self.feature_dim] != self.input_dim:
            raise ValueError(f"x must have shape (B, ...) with input_dim={self.input_dim} features on dim "
                             f"{self.feature_dim} for route='samples', got {tuple(x.shape)}")
        feats = reduce(x.movedim(self.feature_dim, -1), "b ... d -> b d", "mean") if x.dim() > 2 else x
        return x, feats, (x.shape[0],)

    @staticmethod
    def _kept_rows(token_mask: torch.Tensor, tokens_shape) -> torch.Tensor:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be a bool tensor (True = real token), got "
                            f"{getattr(token_mask, 'dtype', type(token_mask).__name__)}")
        if tuple(token_mask.shape) != tuple(tokens_shape):
            raise ValueError(f"token_mask must have the tokens' shape {tuple(tokens_shape)}, "
                             f"got {tuple(token_mask.shape)}")
        return token_mask.reshape(-1).nonzero().squeeze(1)

    def route_rows(self, x: torch.Tensor, tokens_shape=None, kept: Optional[torch.Tensor] = None) -> Routing:
        """Route T rows ``x`` (T, D) and return the record (does not run experts).

        ``kept`` (T,) maps the rows to their ids among all input tokens when some were masked out; the
        record's token ids then refer to all input tokens.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (T, input_dim={self.input_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        logits, noisy, std, probs = self.router(x)
        num_tokens = x.shape[0]
        if self.expert_choice:
            c = expert_capacity(num_tokens, self.num_columns, self.k, self.capacity_factor, self.capacity)
            indices, weights, token_index, expert_index, weight = expert_choice(probs, c)
            host_counts = (c,) * self.num_columns
            count = torch.full((self.num_columns,), c, dtype=torch.long, device=x.device)
            covered = torch.zeros(num_tokens, dtype=torch.bool, device=x.device)
            covered[token_index[: c * self.num_experts]] = True
            dropped = num_tokens - covered.sum()
        else:
            indices, weights, token_index, expert_index, weight = token_choice(probs, self.k, self.normalize)
            count = count_ids(expert_index, self.num_columns)
            host_counts = None if count.is_cuda else tuple(count.tolist())  # on a GPU: read back when needed
            dropped = count[self.num_experts] if self.hole else _NO_DROPS
        if kept is not None:
            token_index = kept.index_select(0, token_index)
            if self.expert_choice:
                indices = kept[indices]
        return Routing(
            mode="expert_choice" if self.expert_choice else "token_choice", num_experts=self.num_experts,
            hole=self.hole, logits=logits, noisy_logits=noisy, noise_std=std, probs=probs, indices=indices,
            weights=weights, token_index=token_index, expert_index=expert_index, weight=weight, count=count,
            tokens_shape=tuple(tokens_shape if tokens_shape is not None else (num_tokens,)), dropped=dropped,
            host_counts=host_counts)

    def dispatch(self, rows: torch.Tensor, routing: Routing, run_expert=None) -> torch.Tensor:
        """Send ``rows`` (T, *F) to the experts the record names and combine: → (T, *F_out).

        ``run_expert(e, x_e, rows_e)`` runs expert e with the call's side inputs; None (no side inputs) runs
        :meth:`expert_forward`, fused where the block is. Expert parallelism overrides this method.
        """
        fused = self._fused_layout if run_expert is None else None
        return dispatch_combine(rows, routing, run_expert or self._run_expert, self.experts, self.aggregation,
                                fused=fused)

    def _run_expert(self, e: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.expert_forward(self.experts[e], x)

    def _side_input_runner(self, tokens_shape, args, kwargs):
        lead = len(tokens_shape)

        def per_row(v):  # (*tokens_shape, ...) → (T, ...) rows to slice; anything else is passed whole
            if isinstance(v, torch.Tensor) and v.dim() >= lead and tuple(v.shape[:lead]) == tuple(tokens_shape):
                return _Rows(v.reshape(-1, *v.shape[lead:]))
            return v

        args = [per_row(a) for a in args]
        kwargs = {n: per_row(v) for n, v in kwargs.items()}

        def take(v, rows):
            return v.rows.index_select(0, rows) if isinstance(v, _Rows) else v

        def run(e: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.expert_forward(self.experts[e], x, *(take(a, rows) for a in args),
                                       **{n: take(v, rows) for n, v in kwargs.items()})
        return run

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        gate = state_dict.get(prefix + "router.gate.weight")
        if isinstance(gate, torch.Tensor) and gate.dim() == 2 and tuple(gate.shape) != (self.num_columns,
                                                                                         self.input_dim):
            rows, cols = gate.shape
            what = (f"input_dim={cols}, this block has input_dim={self.input_dim}" if cols != self.input_dim else
                    f"{rows} router columns, this block has {self.num_columns} "
                    f"({self.num_experts} experts{' + hole' if self.hole else ''})")
            raise ValueError(f"checkpoint does not fit {self.moe_name} at '{prefix or '.'}': the checkpoint has {what}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ views of the last routing
    @property
    def routing_matrix(self) -> torch.Tensor:
        """(T, E') router scores of the last forward."""
        return self._last().probs

    def _last(self) -> Routing:
        if self.routing is None:
            raise RuntimeError(f"{self.moe_name} has not run a forward yet: no routing to show")
        return self.routing

    @torch.no_grad()
    def experts_load(self) -> torch.Tensor:
        """(E', N) long: ``load[e, n]`` = samples whose token at position n went to column e.

        N is the input's second-to-last dim for inputs (B, N, D) and more; 1 for (B, D) inputs and for
        per-sample routing. Row E is the hole when there is one.
        """
        r = self._last()
        positions = r.tokens_shape[-1] if (self.route == "tokens" and len(r.tokens_shape) > 1) else 1
        load = torch.zeros(self.num_columns, positions, dtype=torch.long, device=r.token_index.device)
        pos = r.token_index % positions
        return load.index_put_((r.expert_index, pos), torch.ones_like(pos), accumulate=True)

    @torch.no_grad()
    def abs_experts_load(self) -> torch.Tensor:
        """(E',) long: tokens each router column received in the last forward."""
        return self._last().count.to("cpu", torch.long, copy=True)

    @property
    def fused(self) -> bool:
        """Whether the experts run fused (``fused=True`` at construction)."""
        return self._fused_layout is not None

    @property
    def moe_name(self) -> str:
        layer = self.layer_id if self.layer_id is not None else "?"
        return f"layer {layer} / {type(self).__name__} ({self.num_experts} experts{' + hole' if self.hole else ''})"

    def extra_repr(self) -> str:
        mode = (f"expert_choice(k={self.k}, capacity={self.capacity or f'{self.capacity_factor}x'})"
                if self.expert_choice else f"token_choice(k={self.k}, normalize={self.normalize})")
        parts = [f"layer_id={self.layer_id}", f"experts={self.num_experts}", f"hole={self.hole}", mode,
                 f"noise={self.noise}", f"aux={self.aux_weights or None}", f"aggregation={self.aggregation}",
                 f"route={self.route}"]
        return ", ".join(parts)


def moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """Every MoEBlock in ``model`` (itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``block.aux_loss`` over every MoEBlock of ``model`` from its last forward (0 if none)."""
    losses = [b.aux_loss for b in moe_blocks(model) if b.routing is not None]
    return torch.stack([l.float() for l in losses]).sum() if losses else torch.zeros(())
