"""MoEBlock: the abstract mixture. Subclasses define experts and ``expert_forward``; the block routes.

forward = route (:mod:`moefy.routing`) → dispatch → experts → combine (:mod:`moefy.dispatch`); the options
live in one :class:`~moefy.config.RoutingConfig`.
"""
from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from .checks import check_int
from .config import RoutingConfig
from .dispatch.combine import dispatch
from .dispatch.experts import FusedExperts, LoopedExperts, RunExpert
from .dispatch.fused import fused_layout
from .dispatch.null import ConstantExperts, add_null
from .dispatch.rows import as_rows, kept_rows, with_side_inputs
from .dispatch.shared import RunShared, add_shared
from .fastpaths import compiling as _compiling, set_plain_attribute
from .routing.aux_gradient import DeferredAuxLosses
from .routing.bias_balance import BiasBalance
from .routing.losses import AUX_LOSSES, GlobalBalance
from .routing.record import Routing
from .routing.route import route as make_routing
from .routing.router import Router
from .routing.views import LastRoutingViews


class MoEBlock(LastRoutingViews, nn.Module, ABC):
    """A mixture of experts over any expert modules.

    Subclass it: build the experts, pass them to ``super().__init__(experts=..., input_dim=..., **options)``
    and override :meth:`expert_forward`.

    Args:
        experts: E expert modules (a list or ``nn.ModuleList``).
        input_dim: D, the feature size the router reads.
        config: a :class:`~moefy.config.RoutingConfig`; keyword ``options`` (its field names: ``k``, ``hole``,
            ``noise``, ``aux_criterion``, ``aggregation``, ``expert_choice``, ``route``, ``layer_id``, ...)
            build one or replace fields of ``config``. Every option is documented on RoutingConfig.
        num_experts: optional check that ``len(experts)`` is what the caller expects.
        shared_experts: optional always-on experts (DeepSeek-V3, Qwen2-MoE; :mod:`moefy.dispatch.shared`): run
            by :meth:`expert_forward` on every routed row, their outputs added to the routed mixture (gated
            per row with ``shared_gate=True``). Masked rows skip them; they count in no load or aux loss.

    With ``null_experts`` (MoE++, :mod:`moefy.dispatch.null`) the router has extra columns after the real
    experts; ``block.constant_experts`` holds the constant experts' parameters (None without any).

    The options are readable as attributes (``block.k``, ``block.hole``, ...; ``block.config`` holds them all).
    After a forward: ``block.routing`` (the :class:`~moefy.routing.record.Routing` record), ``block.aux_losses``
    (name → scalar) and ``block.aux_loss`` (their weighted sum). ``block.global_balance``: the global-batch
    counts of ``aux_criterion="global_switch"`` (:class:`~moefy.routing.losses.GlobalBalance`), else None;
    ``block.bias_balance``: the training picks behind ``bias_update_rate``
    (:class:`~moefy.routing.bias_balance.BiasBalance`), else None;
    ``block.router_replay``: set while a :class:`~moefy.routing.replay.RouterReplay` records or replays.
    """

    def __init__(self, experts: Iterable[nn.Module], input_dim: int, config: Optional[RoutingConfig] = None,
                 num_experts: Optional[int] = None, shared_experts: Optional[Iterable[nn.Module]] = None,
                 **options: Any):
        super().__init__()
        self.config = RoutingConfig.from_options(config, **options)
        if isinstance(experts, nn.Module) and not isinstance(experts, nn.ModuleList) or not isinstance(
                experts, Iterable):
            raise TypeError(f"experts must be a non-empty list of nn.Module, got {type(experts).__name__}")
        experts = experts if isinstance(experts, nn.ModuleList) else list(experts)
        if len(experts) == 0 or not all(isinstance(e, nn.Module) for e in experts):
            raise TypeError("experts must be a non-empty list of nn.Module")
        if num_experts is not None and num_experts != len(experts):
            raise ValueError(f"num_experts={num_experts} but {len(experts)} experts were given")
        check_int(input_dim, "input_dim", min=1)
        self.num_columns = self.config.check_columns(len(experts))
        self.input_dim, self.num_experts = input_dim, len(experts)
        self._fused_layout = fused_layout(experts) if self.config.fused else None
        if self.config.fused and self._fused_layout is None:
            raise ValueError("fused=True needs identical experts, each a plain nn.Linear, an nn.Sequential of "
                             "nn.Linear layers and elementwise activations, or a SwiGLU MLP (gate_proj, up_proj, "
                             "down_proj, act_fn; same shapes, no hooks); use fused=False for these experts")

        c = self.config
        self.router = Router(input_dim, self.num_columns, noise=c.noise, temperature=c.temperature,
                             score_func=c.score_func, selection_bias=c.selection_bias)
        self.experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList(experts)
        self.shared_experts = _shared_list(shared_experts)
        if c.shared_gate and self.shared_experts is None:
            raise ValueError("shared_gate=True gates the shared experts' output: pass shared_experts=[...]")
        self.shared_expert_gate = nn.Linear(input_dim, 1, bias=False) if c.shared_gate else None
        constants = (c.null_experts or {}).get("constant", 0)  # MoE++'s constant experts (dispatch/null.py)
        self.constant_experts = ConstantExperts(constants, input_dim) if constants else None
        # the expert-execution seam: how the experts run on their slices (see _execution)
        self._looped = LoopedExperts(self.experts)
        self._fused = FusedExperts(self.experts, self._fused_layout) if self._fused_layout else None
        self.parallel = None  # set by moefy.parallel.expert_parallel: experts sharded over ranks
        # aux_criterion "global_switch": the counts of the global batch (see routing.losses.GlobalBalance)
        self.global_balance = GlobalBalance(self.num_columns) if "global_switch" in c._aux_weights else None
        # bias_update_rate: the training picks behind the aux-loss-free bias update (see routing.bias_balance)
        self.bias_balance = BiasBalance(self.num_experts, c.bias_update_rate) if c.bias_update_rate > 0 else None
        self.router_replay = None  # a RouterReplay's slot while it records or replays this block
        self.routing: Optional[Routing] = None
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.aux_loss = torch.zeros(())
        for i, expert in enumerate(self.experts):
            expert.expert_id = i
            expert.mixture_id = self.moe_name

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
        c = self.config
        # 1. rows: what the experts get (T, *F) and what the router reads (T, D); padding is not routed
        rows, router_in, tokens_shape = as_rows(x, c.route, self.input_dim, c.feature_dim)
        kept = None
        if token_mask is not None:
            kept = kept_rows(token_mask, tokens_shape)
            router_in = router_in.index_select(0, kept)
        # 2. route: the record of who goes where
        routing = self.route_rows(router_in, tokens_shape, kept)
        # 3. dispatch → experts → combine: gather each expert's rows, run them, weighted sum back: (T, *F_out)
        run = with_side_inputs(self.expert_forward, self.experts, tokens_shape, args, kwargs) \
            if args or kwargs else None
        y = self.dispatch(rows, routing, run)
        if routing.num_computed_null:  # 3b. + the copy / constant null experts' slots (MoE++)
            y = add_null(y, rows, routing, self.constant_experts)
        if self.shared_experts is not None:  # 3c. + the always-on shared experts, on the routed rows only
            y = add_shared(y, rows, router_in, kept, len(self.shared_experts), self._shared_runner(
                tokens_shape, args, kwargs), self.shared_expert_gate)
        if c.route == "tokens" and len(tokens_shape) != 1:
            y = y.reshape(*tokens_shape, *y.shape[1:])
        # 4. keep the record; aux losses from it (from the whole group's with expert parallelism)
        set_plain_attribute(self, "routing", routing)
        if self.bias_balance is not None and self.training:
            self.bias_balance.add(routing)
        global_losses = self.parallel is not None and bool(c._aux_weights)
        self.set_aux_losses(self.parallel.loss_routing(routing) if global_losses else routing)
        if c._aux_weights and not _compiling():  # 5. the aux loss's gradient under reentrant checkpointing
            y = self._carry_aux_gradient(y)
        return y

    def route_rows(self, x: torch.Tensor, tokens_shape=None, kept: Optional[torch.Tensor] = None) -> Routing:
        """Route T rows ``x`` (T, D) and return the record (does not run experts).

        ``kept`` (T,) maps the rows to their ids among all input tokens when some were masked out; the
        record's token ids then refer to all input tokens.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x must have shape (T, input_dim={self.input_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        # router_replay: set inside RouterReplay.record() / .replay() (moefy.routing.replay)
        return make_routing(self.router, x, self.config, self.num_experts, tokens_shape, kept, self.router_replay)

    def dispatch(self, rows: torch.Tensor, routing: Routing, run_expert: Optional[RunExpert] = None) -> torch.Tensor:
        """Send ``rows`` (T, *F) to the experts the record names and combine: → (T, *F_out).

        ``run_expert(e, x_e, token_ids_e)`` runs expert e with the call's side inputs; None (no side inputs)
        runs :meth:`expert_forward`.
        """
        experts = self._execution(rows, side_inputs=run_expert is not None)
        return dispatch(rows, routing, experts, run_expert or self._run_expert, self.config.aggregation)

    def _execution(self, rows: torch.Tensor, side_inputs: bool):
        """The one place that decides how the experts run: sharded over ranks (expert parallelism), fused
        (identical Linear / MLP experts, 2-D rows, no side inputs), or one module call per expert."""
        if self.parallel is not None:
            if side_inputs:
                raise ValueError("expert parallelism cannot send side inputs (extra forward arguments) to other "
                                 "ranks; pass them inside x")
            return self.parallel
        if self._fused is not None and not side_inputs and rows.dim() == 2:
            return self._fused
        return self._looped

    def _run_expert(self, e: int, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.expert_forward(self.experts[e], x)

    def _shared_runner(self, tokens_shape, args, kwargs) -> RunShared:
        if args or kwargs:
            return with_side_inputs(self.expert_forward, self.shared_experts, tokens_shape, args, kwargs)
        return lambda j, x, ids: self.expert_forward(self.shared_experts[j], x)

    def set_aux_losses(self, routing: Routing) -> None:
        """Compute ``aux_losses`` (name → scalar) and their weighted sum ``aux_loss`` from ``routing``."""
        weights = self.config._aux_weights
        if weights:
            self.aux_losses = {name: (self.global_balance if name == "global_switch" else AUX_LOSSES[name])(routing)
                               for name in weights}
            self.aux_loss = sum((c * self.aux_losses[n] for n, c in weights.items()), routing.logits.new_zeros(()))
        else:  # no loss: keep one zero per dtype / device instead of a new tensor every call, except under
            # torch.compile, where reading the last call's tensor would read a CUDA graph's recycled output
            zero = self.aux_loss
            if _compiling() or zero.dtype != routing.logits.dtype or zero.device != routing.logits.device or \
                    zero.requires_grad:
                self.aux_loss = routing.logits.new_zeros(())

    def _carry_aux_gradient(self, y: torch.Tensor) -> torch.Tensor:
        """A training forward without a graph (reentrant checkpointing's first pass) keeps a probe as ``aux_loss``;
        its recomputation inside ``backward()`` sends the gradient the probe received to the aux loss through
        ``y`` (:mod:`moefy.routing.aux_gradient`). Any other forward: ``y`` unchanged."""
        deferred = self.__dict__.get("_deferred_aux")
        if deferred is None:  # blocks pickled before it existed
            deferred = self.__dict__["_deferred_aux"] = DeferredAuxLosses()
        if torch.is_grad_enabled():
            return deferred.attach(y, self.aux_loss)
        if self.training and not torch.is_inference_mode_enabled():
            self.aux_loss = deferred.probe(self.aux_loss, self.moe_name)
        return y

    @property
    def aux_weights(self) -> Dict[str, float]:
        """``{loss name: coefficient}`` of the configured aux losses."""
        return self.config._aux_weights

    # ------------------------------------------------------------------ copies and checkpoints
    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, ``pickle``) start as if no forward had run: the last forward's routing
        record and aux losses hold that call's graph, which cannot be deep-copied and is not the block's."""
        state = super().__getstate__()
        state.update(routing=None, aux_losses={}, aux_loss=torch.zeros(()), router_replay=None,
                     _deferred_aux=DeferredAuxLosses())
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        gate = state_dict.get(prefix + "router.gate.weight")
        if isinstance(gate, torch.Tensor) and gate.dim() == 2 and tuple(gate.shape) != (self.num_columns,
                                                                                         self.input_dim):
            rows, cols = gate.shape
            what = (f"input_dim={cols}, this block has input_dim={self.input_dim}" if cols != self.input_dim else
                    f"{rows} router columns, this block has {self.num_columns} "
                    f"({self.num_experts} experts{self._extra_columns()})")
            raise ValueError(f"checkpoint does not fit {self.moe_name} at '{prefix or '.'}': the checkpoint has {what}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _extra_columns(self) -> str:
        null = len(self.config.null_columns)
        return (f" + {null} null experts" if null else "") + (" + hole" if self.hole else "")

    @property
    def moe_name(self) -> str:
        layer = self.layer_id if self.layer_id is not None else "?"
        return f"layer {layer} / {type(self).__name__} ({self.num_experts} experts{self._extra_columns()})"

    def extra_repr(self) -> str:
        text = self.config.summary(self.num_experts)
        return text if self.parallel is None else f"{text}, {self.parallel}"


def _shared_list(shared_experts) -> Optional[nn.ModuleList]:
    """``shared_experts`` as an nn.ModuleList, or None for None / an empty list."""
    if shared_experts is None:
        return None
    if isinstance(shared_experts, nn.Module) and not isinstance(shared_experts, nn.ModuleList) or not isinstance(
            shared_experts, Iterable):
        raise TypeError(f"shared_experts must be None or a list of nn.Module, got {type(shared_experts).__name__}")
    shared = list(shared_experts)
    if not all(isinstance(e, nn.Module) for e in shared):
        raise TypeError("shared_experts must be None or a list of nn.Module")
    return nn.ModuleList(shared) if shared else None


def _config_view(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"``config.{name}`` (read-only).")


for _field in dataclasses.fields(RoutingConfig):  # block.k, block.hole, ...: read-only views of the config
    setattr(MoEBlock, _field.name, _config_view(_field.name))


def moe_blocks(model: nn.Module) -> List[MoEBlock]:
    """Every MoEBlock in ``model`` (itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``block.aux_loss`` over every MoEBlock of ``model`` from its last forward (0 if none), in float32 or
    wider (float64 models keep float64)."""
    losses = [b.aux_loss for b in moe_blocks(model) if b.routing is not None]
    if not losses:
        return torch.zeros(())
    dtype = functools.reduce(torch.promote_types, [l.dtype for l in losses], torch.float32)  # float64 stays
    return torch.stack([l.to(dtype) for l in losses]).sum()
