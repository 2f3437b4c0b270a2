"""from_hf's general path: any transformers MoE family, its own router kept, its experts run by moefy.

transformers 5 runs the experts of most MoE families as one module called ``experts(hidden_states, top_k_index,
top_k_weights)`` (``@use_experts_implementation``). What differs between families is mostly the router (softmax or
sigmoid, groups, biases, ...), the shared experts and the experts' activation. :func:`import_family` replaces
only that experts module of every MoE layer by an :class:`HFExpertsBlock`; the family's router, shared experts and
everything around stay as they are and keep computing as transformers computes them:

- the family's picks (T, k) and weights (T, k) become a moefy :class:`~moefy.routing.record.Routing` record
  (:func:`~moefy.routing.select.from_picks`, :meth:`Routing.build`), with the router's logits (T, E') read from
  the family's router module (the one :func:`~moefy.observe.hf_routing.hf_moe_layers` finds);
- moefy's dispatch and execution seam run the experts on their rows: each expert e is the family's own math on
  its slice of the stacked weights (``gate_up_proj`` / ``up_proj``, the family's ``_apply_gate`` or activation,
  biases, transposed layouts), or, where that math is not the family's (an experts class that overrides its
  forward), the family's experts module called on expert e's rows alone;
- so ``block.routing``, :class:`~moefy.RoutingRecorder`, the plots and the training log, ``moefy.aux_loss``
  (``aux_criterion``, from the softmax of the family's router logits, as transformers' router loss reads
  them), :class:`~moefy.RouterReplay`, ``token_mask`` (on a direct call) and a token-choice capacity
  (``token_capacity_factor``) work on every such family.

Which math runs is decided at import by a probe: the family's experts module and moefy's per-expert math are
run on the same random rows (two picks each, random weights); the import is refused where neither reproduces it.

The weights stay in the family's experts module, ``<block>.experts.hf_experts``: :func:`family_state_dict` is
the model's state dict in the family's own layout, what ``model.save_pretrained`` (replaced on the model) and
:func:`moefy.hf.export` write, so ``from_pretrained`` loads the original class with the same weights.
:func:`moefy.save` records each block in ``moefy.json`` (path, config, ``source``, ``math``, ``num_experts``);
:func:`moefy.load` / :func:`moefy.hf.load` replace the fresh base's experts modules again (:func:`convert_family_at`,
with the recorded math: the probe does not run on the meta device), and the loaded model saves as above.

Two families route to columns their experts never see, recorded as moefy's null experts: LongCat-Flash's zero
experts (``w·x``, added by its own block) as ``"copy"`` columns, Zaya's skip expert as a ``"zero"`` column
(a dropped slot). Families without such an experts call are refused with the reason (:data:`NOT_IMPORTED`).
"""
from __future__ import annotations

import math

import functools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..block import MoEBlock, moe_blocks
from ..config import RoutingConfig
from ..convert.recorded import EntryMismatch
from ..dispatch.rows import kept_rows
from ..fastpaths import set_plain_attribute
from ..observe.hf_routing import (HFMoELayer, _describe, _router_specs, _special, _standard, hf_moe_layers,
                                  is_hf_experts)
from ..routing.record import Routing
from ..routing.replay import check_columns
from ..routing.router import Router
from ..routing.select import from_picks, with_capacity

logger = logging.getLogger(__name__)

__all__ = ["HFExpertsBlock", "import_family", "family_state_dict", "family_blocks", "NOT_IMPORTED", "OPTIONS",
           "convert_family_at", "describe_family_block", "keep_family_layout", "MATHS"]

# RoutingConfig options a family-routed block takes (the family's router decides everything else)
OPTIONS = ("aux_criterion", "layer_id", "token_capacity_factor", "drop_policy")

# observe readers (moefy.observe.hf_routing) whose layers have no experts call to replace, and why
NOT_IMPORTED = {
    "llama4": "Llama 4 scales each expert's input by its router score (a sigmoid, 0 off the top-k) and runs every "
              "expert on every token; moefy's combine weights scale the experts' outputs",
    "jetmoe": "JetMoE's experts take the router's sorted token lists (no experts(hidden_states, top_k_index, "
              "top_k_weights) call), and its attention experts (MoA) route attention projections",
    "doge": "Doge's CDMoE experts are product-key embedding lookups (K² one-vector experts), not an experts module "
            "called with the picks",
}
READERS = ("experts call", "longcat zero experts", "zaya skip expert")
MATHS = ("stacked", "call")  # how an HFExpertsBlock runs the family's experts (probe_math decides at import)
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts", "top_k")


class ExpertSlot(nn.Module):
    """Expert ``expert_id`` of an :class:`HFExpertsBlock`: a place in its expert list, no parameters (the weights
    are rows of the family's stacked tensors). The block runs it (:meth:`HFExpertsBlock.expert_forward`)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"expert {self.index} of a family-routed block has no weights of its own; run it through "
                           f"its HFExpertsBlock (block.expert_forward(block.experts[{self.index}], x))")

    def extra_repr(self) -> str:
        return f"index={self.index}"


class FamilyRouter(Router):
    """Where an :class:`HFExpertsBlock` keeps moefy's router: the family's router routes (it is a module of the
    family's block), so this one has no parameters and never runs. It is what :class:`~moefy.RouterReplay` finds
    at ``block.router`` (a block it can record and replay); ``source`` names the family's router class."""

    def __init__(self, source: str):
        nn.Module.__init__(self)
        self.noise, self.temperature, self.score_func, self.jitter_eps = None, 1.0, "softmax", 0.0
        self.gate, self.noise_std, self.source = None, None, source
        self.register_buffer("score_correction_bias", None)

    def forward(self, x: torch.Tensor):
        raise RuntimeError(f"the router of a family-routed block is the family's {self.source}, which runs inside its "
                           f"MoE block; this placeholder does not route")

    def extra_repr(self) -> str:
        return f"source={self.source!r} (the family's router; no parameters here)"


class HFExpertsBlock(MoEBlock):
    """A transformers experts module as a moefy block: called by the family's MoE block as
    ``experts(hidden_states, top_k_index, top_k_weights)``, it records the family's picks and runs the experts
    through moefy's dispatch (see the module docstring). Made by :func:`import_family`.

    Args:
        hf_experts: the family's experts module (kept as ``hf_experts``, with its weights).
        router: the family's router module (its output holds the logits; a forward hook reads them).
        router_index: where the logits are in the router's output (a tuple), as
            :class:`~moefy.observe.hf_routing.HFMoELayer` says.
        dim: D, the hidden size.
        num_experts: E.
        k: the family's experts per token (null columns included).
        math: ``"stacked"`` (the family's math on its stacked weights) or ``"call"`` (its experts module called
            on one expert's rows).
        reader: ``"experts call"``, ``"longcat zero experts"`` or ``"zaya skip expert"``.
        null_columns: the kinds of the router columns past E (``("copy",) * Z`` for LongCat, ``("zero",)`` for
            Zaya).
        source: the family's MoE block class name.
        input_module: the module whose input has the routed tokens' shape (B, L) (the family's block).
        config: extra options (:data:`OPTIONS`): ``aux_criterion``, ``layer_id``, ``token_capacity_factor``,
            ``drop_policy``.
    Forward: ``hidden_states`` (T, D) or (..., D), ``top_k_index`` / ``top_k_weights`` (T, k) → (..., D), the
    weighted sum of the picked experts' outputs (what the family's experts module returns). ``token_mask``
    (bool, ``hidden_states.shape[:-1]``, True = route) drops the other tokens (zero output, in no count).
    """

    def __init__(self, hf_experts: nn.Module, router: nn.Module, router_index: int, dim: int, num_experts: int,
                 k: int, math: str, reader: str = "experts call", null_columns: Tuple[str, ...] = (), source: str = "",
                 input_module: Optional[nn.Module] = None, config: Optional[RoutingConfig] = None):
        if math not in MATHS:
            raise ValueError(f"math must be one of {MATHS}, got {math!r}")
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        nulls = {kind: null_columns.count(kind) for kind in dict.fromkeys(null_columns)} or None
        config = RoutingConfig.from_options(config, k=k, null_experts=nulls, route="tokens")
        super().__init__([ExpertSlot(e) for e in range(num_experts)], dim, config=config)
        if self.config.null_columns != tuple(null_columns):
            raise ValueError(f"null_columns {null_columns} must be ordered as {self.config.null_columns}")
        self.hf_experts = hf_experts
        self.router = FamilyRouter(type(router).__name__)
        self.math, self.reader, self.source, self.router_index = math, reader, source, router_index
        self.__dict__["_family_router"] = router  # not a child: it stays the family block's module
        self.__dict__["_hooks"] = [router.register_forward_hook(self._on_router_output)]
        if input_module is not None:  # the routed tokens' shape; the router's output (its graph) dropped after
            self._hooks.append(input_module.register_forward_pre_hook(self._on_block_input, with_kwargs=True))
            self._hooks.append(input_module.register_forward_hook(self._forget_router, always_call=True))
        self.__dict__.update(_router_out=None, _tokens_shape=None, _forget_on_read=input_module is None)

    # ---------------------------------------------------------------------------- the family's router, read
    def _on_block_input(self, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        shape = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
        self.__dict__.update(_tokens_shape=shape, _router_out=None)

    def _on_router_output(self, module, args, output) -> None:
        self.__dict__["_router_out"] = output

    def _forget_router(self, *args) -> None:
        self.__dict__["_router_out"] = None

    def _router_logits(self, tokens: int) -> Tuple[torch.Tensor, Any]:
        """The (T, E') logits of the router's last output (with their graph) and that whole output (kept until the
        family's block returns: a block may call its experts more than once per routing)."""
        out = self.__dict__["_router_out"]
        if self.__dict__.get("_forget_on_read", True):
            self.__dict__["_router_out"] = None  # its graph is the forward's, not the block's
        full = out
        if isinstance(out, (tuple, list)):
            out = out[self.router_index] if len(out) > self.router_index else None
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1:
            logits = out.reshape(-1, out.shape[-1])
            if logits.shape == (tokens, self.num_columns):
                return logits, full
        what = "no router output" if full is None else f"router output {_describe(full)}"
        raise RuntimeError(f"{self.moe_name} ({self.source}): cannot read the router logits of "
                           f"{self.router.source} ({what}; expected (T={tokens}, E'={self.num_columns}) at index "
                           f"{self.router_index}); the family's router must run before its experts")

    # ---------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() == 0 or \
                hidden_states.shape[-1] != self.input_dim:
            raise ValueError(f"hidden_states must have shape (..., D={self.input_dim}), got "
                             f"{_describe(hidden_states)}")
        x = hidden_states.reshape(-1, self.input_dim)                          # (T, D)
        tokens = x.shape[0]
        index = top_k_index.reshape(tokens, -1)                                # (T, k)
        weights = top_k_weights.reshape(tokens, -1)                            # (T, k)
        if index.shape[1] != self.k:
            raise RuntimeError(f"{self.moe_name} ({self.source}): the experts got {index.shape[1]} picks per token, "
                               f"the family routes k={self.k}")
        logits, router_out = self._router_logits(tokens)                       # (T, E'), the family's
        index, weights = self._family_picks(index, weights, logits, router_out)
        shape = self.__dict__["_tokens_shape"]
        shape = shape if shape is not None and math.prod(shape) == tokens else (tokens,)
        kept = None
        if token_mask is not None:
            kept = kept_rows(token_mask, tuple(hidden_states.shape[:-1]))
            index, weights, logits = index[kept], weights[kept], logits[kept]
        index, weights = self._replayed(index, weights)
        routing = self._record(index, weights, logits, shape, kept)
        y = self.dispatch(x, routing)                                          # (T, D), moefy's seam
        set_plain_attribute(self, "routing", routing)
        self.set_aux_losses(routing)
        if self.config._aux_weights and not torch.compiler.is_compiling():
            y = self._carry_aux_gradient(y)
        return y.reshape(hidden_states.shape).to(hidden_states.dtype)

    def _family_picks(self, index, weights, logits, router_out):
        """The picks as moefy records them: the experts call's, with the family's null columns restored."""
        if self.reader == "longcat zero experts":
            _, router_weights, router_index = router_out                   # (T, k) each, null columns ≥ E
            zero = router_index >= self.num_experts
            if not (torch.equal(torch.where(zero, index, router_index), index) and torch.equal(
                    router_weights.masked_fill(zero, 0.0).to(weights.dtype), weights)):
                raise RuntimeError(f"{self.moe_name} ({self.source}): the router's picks do not match the experts "
                                   f"call (transformers changed how LongCat-Flash hands zero experts over)")
            return router_index, torch.where(zero, router_weights.to(weights.dtype), weights)
        if self.reader == "zaya skip expert":                               # redo the picks as the router does
            with torch.no_grad():
                probs = torch.softmax(logits, dim=-1)
                picks = torch.topk(probs.float() + self._family_router.balancing_biases, index.shape[1],
                                   dim=-1).indices
                skip = picks == self.num_experts
                same = torch.equal(picks.masked_fill(skip, 0), index) and torch.equal(
                    probs.gather(1, picks).masked_fill(skip, 0).to(weights.dtype), weights)
            if not same:
                raise RuntimeError(f"{self.moe_name} ({self.source}): the redone router picks do not match the "
                                   f"experts call (transformers changed Zaya's router)")
            return picks, weights
        return index, weights

    def _replayed(self, index: torch.Tensor, weights: torch.Tensor):
        """While a RouterReplay records: as they are. While it replays: the recorded picks; ``"recompute"`` weights
        are this forward's family weights, so every token must pick the recorded experts again (the family's
        weighting of other experts is its router's, which moefy cannot redo); ``"frozen"``: the recorded weights."""
        slot = self.router_replay
        call = slot.take() if slot is not None else None
        if call is None:
            return index, weights
        check_columns(call, self.num_columns)
        recorded = call.indices.to(index.device)
        if recorded.shape != index.shape:
            raise ValueError(f"router replay: indices were recorded with shape {tuple(recorded.shape)} but this "
                             f"forward routes {tuple(index.shape)} picks; replay the same tokens")
        same = torch.equal(recorded.sort(dim=-1).values, index.sort(dim=-1).values)
        if call.mode == "recompute":
            if not same:
                raise RuntimeError(f"router replay: {self.moe_name} keeps {self.source}'s router, whose weights for "
                                   f"experts it did not pick moefy cannot recompute, and some tokens pick other "
                                   f"experts than recorded; replay with weights='frozen'")
            return index, weights
        if not same and self.config.null_columns:
            raise RuntimeError(f"router replay: {self.source} computes its null experts ({self.config.null_columns}) "
                               f"from its own picks, which differ from the recorded ones; replay cannot change them")
        return recorded, call.weights.to(weights.device, weights.dtype)

    def _record(self, index, weights, logits, shape, kept) -> Routing:
        """The Routing record (and its selection) of the family's picks."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        probs = torch.softmax(logits, dim=-1)                                  # (T, E')
        picked = from_picks(index, weights, self.num_columns, self.num_experts, self.config.zero_columns)
        picked = with_capacity(picked, probs, self.config, self.num_experts)
        routing = Routing.build((logits, logits, None, probs), picked, self.num_experts, False, shape, kept,
                                self.config.null_columns)
        if self.router_replay is not None:
            self.router_replay.keep(routing)
        return routing

    # ---------------------------------------------------------------------------- the experts
    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert.index`` of the family on its rows ``x`` (n, D) → (n, D)."""
        if self.math == "stacked":
            return stacked_expert(self.hf_experts, expert.index, x)
        return called_expert(self.hf_experts, expert.index, x)

    def _execution(self, rows: torch.Tensor, side_inputs: bool):
        """The stacked math runs all rows at once (:func:`stacked_rows`); per-expert calls loop (the seam's
        looped implementation); expert parallelism as for any block."""
        if self.math == "stacked" and self.parallel is None and not side_inputs and rows.dim() == 2:
            return self._run_stacked
        return super()._execution(rows, side_inputs)

    def _run_stacked(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing, run_expert) -> torch.Tensor:
        return stacked_rows(self.hf_experts, rows, routing)

    # ---------------------------------------------------------------------------- copies and checkpoints
    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        """A state dict in the family's layout (what ``save_pretrained`` writes, :func:`family_state_dict`: what a
        Trainer resumes from, with ``load_state_dict(strict=False)``) holds the experts module's tensors at this
        block's place: they load into ``hf_experts``, as the blocks' own layout does, instead of being skipped."""
        for name, _ in [*self.hf_experts.named_parameters(), *self.hf_experts.named_buffers()]:
            if prefix + name in state_dict and prefix + "hf_experts." + name not in state_dict:
                state_dict[prefix + "hf_experts." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(_router_out=None, _tokens_shape=None)  # the last forward's, with its graph
        return state

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, router={self.router.source!r}, k={self.k}, math={self.math!r}"
                + (f", null_columns={self.config.null_columns}" if self.config.null_columns else "")
                + (f", aux_criterion={self.config.aux_criterion!r}" if self.config.aux_criterion else ""))


# -------------------------------------------------------------------------------------------- expert math
def stacked_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a ``@use_experts_implementation`` module on rows ``x`` (n, D), as transformers' grouped
    and batched implementations compute it: up (``gate_up_proj`` or ``up_proj``, + bias), the family's
    ``_apply_gate`` (or its ``act_fn`` without a gate), down (+ bias), the optional post-expert norm."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    x = x if x.dtype == up.dtype else x.to(up.dtype)
    h = x @ up[e] if experts.is_transposed else F.linear(x, up[e])
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias)[e]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = h @ experts.down_proj[e] if experts.is_transposed else F.linear(h, experts.down_proj[e])
    if experts.has_bias:
        y = y + experts.down_proj_bias[e]
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    return y


def stacked_rows(experts: nn.Module, rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert of a ``@use_experts_implementation`` module on its rows, as :func:`stacked_expert` computes one:
    ``rows`` (A, D) grouped by expert (``routing.expert_index[:A]``) → (A, D).

    The up and down projections run as one grouped mm over the stacked weights where that has a fast kernel
    (CUDA, bfloat16, compute capability ≥ 9.0), else as one matmul per expert with rows on its slice, the weights
    taken apart once (``unbind``: backward writes one gradient for the stacked tensor, not one per expert); the gate
    (or activation), the biases and the post-expert norm run once on all rows."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj                # (E, 2H, D) or transposed
    rows = rows if rows.dtype == up.dtype else rows.to(up.dtype)
    num_rows, num_experts = rows.shape[0], up.shape[0]
    if num_rows == 0:  # nothing routed: an empty output that still reaches the weights (zero gradients)
        zero = sum(p.sum() for p in experts.parameters() if p.requires_grad) * 0
        return rows.new_zeros(0, rows.shape[1]) + zero
    expert_index = routing.expert_index[:num_rows]
    if _grouped_kernel(rows, up):
        ends = torch.arange(1, num_experts + 1, device=rows.device, dtype=expert_index.dtype)
        offsets = torch.searchsorted(expert_index, ends, out_int32=True)

        def project(x, weight):
            return torch._grouped_mm(x, weight if experts.is_transposed else weight.transpose(1, 2), offs=offsets)
    else:
        counts = routing.counts[:num_experts]
        active = [e for e, n in enumerate(counts) if n]
        sizes = [counts[e] for e in active]

        def project(x, weight):
            weights = weight.unbind(0)
            outs = [x_e @ weights[e] if experts.is_transposed else F.linear(x_e, weights[e])
                    for e, x_e in zip(active, x.split_with_sizes(sizes))]
            return torch.cat(outs) if len(outs) > 1 else outs[0]
    h = project(rows, up)                                                                # (A, 2H) or (A, H)
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias).index_select(0, expert_index)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)              # (A, H)
    y = project(h, experts.down_proj)                                                   # (A, D)
    if experts.has_bias:
        y = y + experts.down_proj_bias.index_select(0, expert_index)
    if experts.has_post_expert_norm:
        y = experts.post_expert_norm(y)
    return y


def _grouped_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where ``torch._grouped_mm`` has a fast kernel: CUDA, bfloat16, compute capability ≥ 9.0, 16-byte rows."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(d % 8 == 0 for d in weight.shape[1:]))


def called_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on rows ``x`` (n, D) by calling the family's experts module with every row on ``e``, weight 1."""
    picks = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
    return experts(x, picks, x.new_ones(x.shape[0], 1)).reshape(x.shape)  # DBRX's comes back (n, 1, D)


def _has_stacked_math(experts: nn.Module) -> bool:
    names = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(experts, n, None), bool) for n in names):
        return False
    up = getattr(experts, "gate_up_proj" if experts.has_gate else "up_proj", None)
    return isinstance(up, torch.Tensor) and up.dim() == 3 and isinstance(getattr(experts, "down_proj", None),
                                                                          torch.Tensor)


@torch.no_grad()
def probe_math(experts: nn.Module, dim: int, num_experts: int) -> Optional[str]:
    """``"stacked"`` or ``"call"``: the first of moefy's ways to run the experts (:func:`stacked_rows`, or
    :func:`called_expert` per expert) that reproduces the family's experts module on random rows (2 per expert, two
    picks each, random weights); None where neither does."""
    param = next((p for p in experts.parameters() if p.is_floating_point()), None)
    if param is None or param.device.type == "meta":
        return None
    rows = 2 * num_experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(param.device, param.dtype)
    first = torch.arange(rows) % num_experts
    index = torch.stack([first, (first + 1 + torch.arange(rows) // num_experts) % num_experts], 1).to(param.device)
    weights = (torch.rand(rows, 2, generator=gen) + 0.5).to(param.device, param.dtype)
    flat = index.reshape(-1)
    column, order = flat.sort(stable=True)                      # the slots grouped by expert, as dispatch does
    token = torch.div(order, 2, rounding_mode="floor")
    groups = _Groups(column, tuple(torch.bincount(flat, minlength=num_experts).tolist()))
    was_training = experts.training
    experts.eval()
    try:
        want = experts(x, index, weights).float().reshape(rows, dim)
        tol = 1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2
        for math in ("stacked", "call"):
            if math == "stacked" and not _has_stacked_math(experts):
                continue
            try:
                if math == "stacked":
                    out = stacked_rows(experts, x[token], groups)
                else:
                    out = torch.cat([called_expert(experts, e, x_e) for e, x_e in
                                     enumerate(x[token].split_with_sizes(groups.counts))])
                got = torch.zeros_like(want).index_add_(0, token, out.float() * weights.reshape(-1)[order, None])
            except Exception as err:  # noqa: BLE001 - that way does not apply to this class
                logger.debug("%s: %s math fails (%s)", type(experts).__name__, math, err)
                continue
            if torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):  # at the outputs' scale
                return math
    finally:
        experts.train(was_training)
    return None


class _Groups:
    """What :func:`stacked_rows` reads of a record: ``expert_index`` (A,) and host ``counts`` (E,)."""

    def __init__(self, expert_index: torch.Tensor, counts: Tuple[int, ...]):
        self.expert_index, self.counts = expert_index, counts


# -------------------------------------------------------------------------------------------- import
def _top_k(layer: HFMoELayer, config) -> int:
    for owner in (layer.router, layer.block):
        for name in _TOP_K_FIELDS:
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in (text, getattr(text, "ffn_config", None)):
        for name in _TOP_K_FIELDS + ("moe_top_k",):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    raise ValueError(f"model: cannot find how many experts {type(layer.block).__name__} picks per token (no "
                     f"{_TOP_K_FIELDS} on its router, block or config)")


def _hidden_size(layer: HFMoELayer, config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"model: its config has no hidden_size (d_model) for {type(layer.block).__name__}")


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, module in parent.named_children() if module is child)


def check_options(options: Dict[str, Any], what: str) -> None:
    """ValueError naming the first option a family-routed block cannot take."""
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"option {name}={value!r}: {what} keeps the family's own router (from_hf's general "
                             f"path), which decides everything else; allowed options: {list(OPTIONS)}")


def import_family(model: nn.Module, **options) -> nn.Module:
    """Replace the experts module of every MoE layer of a transformers model by an :class:`HFExpertsBlock`, in
    place, keeping the family's router (see the module docstring). What :func:`moefy.hf.from_hf` does for the
    families without a RoutingConfig mapping (and for every family with ``keep_router=True``).

    Args:
        model: a transformers MoE model (any family whose experts are called as ``experts(hidden_states,
            top_k_index, top_k_weights)``).
        **options: :data:`OPTIONS` for every block (``aux_criterion={"switch": 0.01}``, ...).
    Returns:
        ``model``, its experts modules replaced (``layer_id`` = the decoder layer index); same logits.
    Raises:
        ValueError: no such MoE layer, a family without that experts call (:data:`NOT_IMPORTED`, with the reason),
            an experts module whose math the probe cannot reproduce, or an option the general path does not take.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    what = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    check_options(options, what)
    layers, skipped = hf_moe_layers(model, exclude=moe_blocks(model))
    if not layers:
        done = " (already imported by from_hf?)" if moe_blocks(model) else ""
        why = f"; {skipped[0]}" if skipped else ""
        raise ValueError(f"model: {what} is not a Hugging Face MoE model moefy imports: no MoE layer with an experts "
                         f"module called as experts(hidden_states, top_k_index, top_k_weights) left{done}{why}")
    for layer in layers:
        if layer.reader in NOT_IMPORTED:
            raise ValueError(f"model: {what} cannot be imported: {NOT_IMPORTED[layer.reader]} "
                             f"({layer.name}: {type(layer.block).__name__})")
    dim = _hidden_size(layers[0], config)
    plan = []
    for layer in layers:  # check everything before changing anything; each module (a replaced forward, hooks)
        math = probe_math(layer.experts, dim, layer.num_experts)
        if math is None:
            raise ValueError(f"model: {what} cannot be imported: neither the stacked-weights math nor per-expert "
                             f"calls reproduce {type(layer.experts).__name__} ({layer.name}) on a probe")
        routing = RoutingConfig.from_options(None, **{"layer_id": layer.layer_id, **options})
        plan.append((layer, math, _top_k(layer, config), routing))
    for layer, math, k, routing in plan:
        block = HFExpertsBlock(layer.experts, layer.router, layer.router_index, dim, layer.num_experts, k, math,
                               layer.reader, layer.null_columns, type(layer.block).__name__, layer.input_module,
                               routing)
        block.train(layer.experts.training)
        setattr(layer.block, _child_name(layer.block, layer.experts), block)
    keep_family_layout(model)
    logger.info("moefy.hf.from_hf: %d experts modules of %s -> HFExpertsBlock (family routers kept)", len(plan), what)
    return model


# -------------------------------------------------------------------------------------------- moefy.save / load
def describe_family_block(block: HFExpertsBlock) -> Dict[str, Any]:
    """What ``moefy.json`` records of ``block`` besides its path and config: what :func:`convert_family_at` cannot
    read from the base model without running its weights (``math``: the import's probe) and what it checks it
    against (``source``, ``num_experts``)."""
    return {"source": block.source, "math": block.math, "num_experts": block.num_experts}


def _family_layer(model: nn.Module, path: str) -> HFMoELayer:
    """The MoE layer of ``model`` whose experts module is ``model.<path>``, found as :func:`import_family` finds
    it; :class:`EntryMismatch` on ``path`` where it is none."""
    experts = model.get_submodule(path)
    block_name, _, child = path.rpartition(".")
    block = model.get_submodule(block_name)
    what = (f"{path!r} is a {type(experts).__name__} in a {type(block).__name__}, not the experts module of a MoE "
            f"block from_hf imports with its router kept (called as experts(hidden_states, top_k_index, "
            f"top_k_weights))")
    if not child or isinstance(experts, MoEBlock) or not is_hf_experts(experts):
        raise EntryMismatch("path", what)
    if _special(block_name, block, 0, block) is not None:  # Llama 4, JetMoE, Doge: NOT_IMPORTED
        raise EntryMismatch("path", f"{what}: {type(block).__name__} is not imported")
    layer = _standard(block_name, block, experts, _router_specs(model), 0)
    if isinstance(layer, str):
        raise EntryMismatch("path", f"{what}: {layer}")
    return layer


def convert_family_at(model: nn.Module, path: str, routing: RoutingConfig, num_experts: int,
                      fields: Dict[str, Any]) -> HFExpertsBlock:
    """Replace the family's experts module at ``path`` of ``model`` by an :class:`HFExpertsBlock`, in place, as
    :func:`import_family` does (what :func:`moefy.load` re-applies from ``moefy.json``): with the recorded ``math``
    (the import's probe runs the weights, which the loader's meta-device check has not) and ``routing``.

    Args:
        model: the base model (a fresh one of the saved class; on the meta device for the loader's check).
        path: the experts module's path.
        routing: the recorded config (``k``, null columns and ``route`` as the family's; :data:`OPTIONS`).
        num_experts: E, the experts the weights hold there (the base's experts module must have as many).
        fields: the recorded ``source`` (the family block's class), ``math``, ``num_experts``.
    Raises:
        EntryMismatch: the base model does not match the entry's ``path``, ``source``, ``num_experts``, ``math``
            or ``config`` (nothing changed).
    """
    layer = _family_layer(model, path)
    source = type(layer.block).__name__
    if fields["source"] != source:
        raise EntryMismatch("source", f"{fields['source']!r}, but {path!r} is the experts module of a {source}; "
                                      f"allowed: {source!r}")
    if layer.num_experts != num_experts:
        raise EntryMismatch("num_experts", f"{num_experts}, but the base model's {source} at {path!r} has "
                                           f"{layer.num_experts} experts")
    if fields["math"] == "stacked" and not _has_stacked_math(layer.experts):
        raise EntryMismatch("math", f"'stacked', but {type(layer.experts).__name__} at {path!r} has no stacked "
                                    f"weights moefy runs; allowed: 'call'")
    config = getattr(model, "config", None)
    k, dim = _top_k(layer, config), _hidden_size(layer, config)
    param = next((p for p in layer.experts.parameters() if p.is_floating_point()), None)
    if fields["math"] == "stacked" and param is not None and param.device.type != "meta" and \
            probe_math(layer.experts, dim, num_experts) != "stacked":  # the import's probe, where weights exist
        raise EntryMismatch("math", f"'stacked', but moefy's stacked math does not reproduce "
                                    f"{type(layer.experts).__name__} at {path!r} on a probe; allowed: 'call'")
    nulls = {kind: layer.null_columns.count(kind) for kind in dict.fromkeys(layer.null_columns)} or None
    family = RoutingConfig.from_options(None, k=k, null_experts=nulls, route="tokens",
                                        **{name: getattr(routing, name) for name in OPTIONS})
    if family != routing:
        raise EntryMismatch("config", f"{source} at {path!r} routes with its own router: k={k}, null_experts="
                                      f"{nulls}, route='tokens', and only the options {list(OPTIONS)} of the "
                                      f"recorded config apply; it records {routing.summary(num_experts)}")
    block = HFExpertsBlock(layer.experts, layer.router, layer.router_index, dim, num_experts, k, fields["math"],
                           layer.reader, layer.null_columns, source, layer.input_module, routing)
    block.train(layer.experts.training)
    setattr(layer.block, path.rpartition(".")[2], block)
    return block


def keep_family_layout(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the family's own layout (:func:`family_state_dict`), so the folder
    loads as the original class with ``from_pretrained``; a model without ``save_pretrained`` is left as it is."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(_save_pretrained, model)


# -------------------------------------------------------------------------------------------- the family's layout
def family_blocks(model: nn.Module) -> List[Tuple[str, HFExpertsBlock]]:
    """``(path, block)`` of every :class:`HFExpertsBlock` in ``model``."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, HFExpertsBlock)]


def family_state_dict(model: nn.Module, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """``state`` (default ``model.state_dict()``) in the family's own layout: each block's ``hf_experts.*`` back at
    the experts module's place, the block's moefy-only state (training counters) left out."""
    state = model.state_dict() if state is None else state
    blocks = [path + "." for path, _ in family_blocks(model)]
    out = {}
    for key, value in state.items():
        owner = next((p for p in blocks if key.startswith(p)), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + "hf_experts."):
            out[owner + key[len(owner + "hf_experts."):]] = value
    return out


def _save_pretrained(model: nn.Module, save_directory, *args, state_dict=None, **kwargs):
    """``model.save_pretrained`` of an imported model: transformers' own, with the family's state dict, so the folder
    loads as the original class (``from_pretrained``), same weights; the moefy options are not kept."""
    return type(model).save_pretrained(model, save_directory, *args, state_dict=family_state_dict(model, state_dict),
                                       **kwargs)

