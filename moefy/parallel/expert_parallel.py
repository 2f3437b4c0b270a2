"""Expert parallelism over ``torch.distributed``: the E experts of a mixture split over the W ranks of a group.

Every rank keeps the router (replicated) and E/W experts (sharded: rank r of the group holds the contiguous
experts ``r·E/W … (r+1)·E/W − 1``). Each rank routes its own tokens, then::

    counts all-to-all ─► tokens all-to-all ─► local experts on contiguous slices ─► results all-to-all ─► combine

The two token exchanges are autograd functions built on :func:`torch.distributed.all_to_all_single` (gloo on
CPU, NCCL on GPU; uneven and zero splits are fine), so gradients reach the experts on other ranks and come
back to the tokens. Every rank issues the same collectives in the same order whatever its tokens, so a rank
whose tokens all go elsewhere, or that has no tokens at all, takes part and does not hang.

Gradient convention (what makes one optimizer step equal the single-process step on the concatenated batch):
each rank's loss is its part of the global loss times W (a per-rank mean loss over equal local batches is
exactly that), replicated parameters are averaged over the group (DDP), and sharded expert parameters, which
collect gradient from every rank's tokens, are divided by W inside the exchange (``average_expert_grads``).

Recipe with DDP (``torchrun --nproc_per_node=W``; the same seed on every rank)::

    dist.init_process_group("gloo")                 # "nccl" on GPUs; move the model to its GPU first
    model = build_model()                           # identical on every rank
    expert_parallel(model, group=dist.new_group())  # experts: sharded; router and the rest: replicated
    ddp = DDP(model)                                # all-reduces the replicated gradients only
    loss = loss_fn(ddp(x_local), y_local) + coef * moefy.aux_loss(model)

The experts exchange on their own group so their all-to-alls never interleave with DDP's all-reduces.
:func:`expert_parallel` tells DDP to ignore the sharded experts of the module it was given
(``DDP._set_params_and_buffers_to_ignore_for_model(module, sharded_names(module))``, added to any names already
set); wrap that same module in DDP, or repeat the call on the module you wrap.

Recipe with FSDP2 (``torch.distributed.fsdp.fully_shard``; gloo or NCCL): shard the experts first, then let
FSDP shard the rest, ignoring the experts (FSDP averages the gradients of what it shards, as DDP does). Each
router is its own FSDP unit: FSDP2 wants one parameter dtype per unit, and routers stay float32 in a bf16
model::

    expert_parallel(model, group=dist.new_group())
    experts = sharded_params(model)                 # moefy.parallel: the parameters expert_parallel sharded
    for block in moe_blocks(model):
        fully_shard(block.router, ignored_params=experts)
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=experts)
    fully_shard(model, ignored_params=experts)

Without ``ignored_params`` FSDP would all-gather halves of different ranks' experts into one weight; the
forward refuses that with a RuntimeError.
Checkpoints: ``model.state_dict()`` on each rank names experts by global id;
:func:`~moefy.parallel.checkpoint.merge_state_dicts` of all ranks' dicts (or
:func:`~moefy.parallel.checkpoint.full_state_dict`) loads into the unsharded model or on any number of ranks.
"""
from __future__ import annotations

import logging
from typing import Iterator, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..block import MoEBlock
from ..dispatch.experts import LoopedExperts, RunExpert, run_slices
from ..routing.record import Routing
from ..routing.select import from_picks

logger = logging.getLogger(__name__)

AUX_SCOPES = ("global", "local")

try:  # FSDP2 (``fully_shard``) and tensor parallelism keep parameters as DTensors
    from torch.distributed.tensor import DTensor  # torch >= 2.4
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a parameter sharded by FSDP2's ``fully_shard``)."""
    return DTensor is not None and isinstance(t, DTensor)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward is the reverse exchange, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group, grad_scale):
        ctx.splits, ctx.group, ctx.grad_scale = (recv_splits, send_splits), group, grad_scale
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_splits, send_splits = ctx.splits
        grad = _AllToAll.apply(grad.contiguous(), send_splits, recv_splits, ctx.group, 1.0)
        return (grad * ctx.grad_scale if ctx.grad_scale != 1.0 else grad), None, None, None, None


def exchange(x: torch.Tensor, recv_splits: Sequence[int], send_splits: Sequence[int],
             group: Optional[dist.ProcessGroup] = None, grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable all-to-all: rows ``x[send_splits[:j].sum() : …]`` (n, *F) go to rank j; returns the
    (sum(recv_splits), *F) rows received, grouped by source rank. The backward sends gradients back the
    same way and multiplies them by ``grad_scale``."""
    return _AllToAll.apply(x, list(recv_splits), list(send_splits), group, float(grad_scale))


class ShardedExperts(nn.Module):
    """The experts one rank holds, indexed and named by their *global* ids.

    ``experts[e]`` is global expert e (an ``IndexError`` names the owner when another rank holds it); state
    dict keys read ``experts.{e}.…`` exactly as in the unsharded ``nn.ModuleList``, so a checkpoint records
    where every expert belongs. Loading a state dict keeps the local experts' keys and drops the others, so a
    full checkpoint loads on any number of ranks.
    """

    def __init__(self, experts: Mapping[int, nn.Module], num_experts: int):
        super().__init__()
        self.global_ids: List[int] = sorted(experts)
        self.num_experts = num_experts
        for e in self.global_ids:
            self.add_module(str(e), experts[e])
        self.register_load_state_dict_pre_hook(ShardedExperts._keep_local_keys)

    def __getitem__(self, e: int) -> nn.Module:
        if str(e) not in self._modules:
            raise IndexError(f"expert {e} is not on this rank (it holds experts {self.global_ids} of "
                             f"{self.num_experts})")
        return self._modules[str(e)]

    def __len__(self) -> int:
        return len(self.global_ids)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    @staticmethod
    def _keep_local_keys(module, state_dict, prefix, *_):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix):].split(".", 1)[0] not in module._modules:
                del state_dict[key]


class ExpertParallelExperts:
    """The expert-execution seam over ranks (:mod:`moefy.dispatch.experts`): this rank's rows, grouped by
    global expert, go to the ranks that hold their experts and their outputs come back in the same order.

    :func:`expert_parallel` puts one on every MoEBlock as ``block.parallel``. Attributes: ``group``,
    ``rank``, ``world``, ``aux_scope``, ``average_expert_grads``; after a forward ``rank_tokens`` (routed
    tokens of every rank) and, with global aux losses, ``global_routing`` (the record of the whole group's
    batch). ``block.routing`` stays this rank's own.
    """

    def __init__(self, experts: ShardedExperts, group: Optional[dist.ProcessGroup], rank: int, world: int,
                 aux_scope: str, average_expert_grads: bool):
        self.experts, self.group, self.rank, self.world = experts, group, rank, world
        self.aux_scope, self.average_expert_grads = aux_scope, average_expert_grads
        self.rank_tokens: Optional[List[int]] = None
        self.global_routing: Optional[Routing] = None
        self._params = _registered_params(experts)

    def _check_experts_not_resharded(self) -> None:
        """Refuse experts that FSDP's ``fully_shard`` took over: each rank holds different experts under
        different names, so FSDP would all-gather halves of different experts into one weight and average
        their gradients, training silently wrong. FSDP replaces the parameters it shards (with DTensors, and
        with unsharded copies inside the forward); parameters passed as ``ignored_params`` stay the ones
        :func:`expert_parallel` kept. A replacement outside FSDP (``load_state_dict(assign=True)``) is accepted."""
        for module, name, param in self._params:
            if module._parameters.get(name) is param:
                continue
            if getattr(module, "_is_fsdp_managed_module", False):  # set on every module fully_shard manages
                raise RuntimeError(
                    f"the expert-parallel experts {self.experts.global_ids} on rank {self.rank} were sharded by "
                    "FSDP (fully_shard): different ranks hold different experts, so FSDP would mix them. Pass "
                    "them as ignored_params: fully_shard(module, ignored_params=sharded_params(model)) for "
                    "every fully_shard call (moefy.parallel.sharded_params)")
            self._params = _registered_params(self.experts)
            return

    def __call__(self, rows: torch.Tensor, token_index: torch.Tensor, routing: Routing,
                 run_expert: RunExpert) -> torch.Tensor:
        """``rows`` (A, *F) grouped by global expert → their experts' outputs (A, *F_out), same order."""
        self._check_experts_not_resharded()
        world, local, device = self.world, len(self.experts), rows.device
        counts = routing.counts[:routing.num_experts]
        # 1. counts: row j tells rank j how many rows are coming for each of its experts (and our T)
        table = torch.tensor([[routing.num_tokens, *counts[j * local:(j + 1) * local]] for j in range(world)],
                             dtype=torch.long, device=device)
        got = torch.empty_like(table)
        dist.all_to_all_single(got, table, group=self.group)
        got = got.tolist()
        self.rank_tokens = [g[0] for g in got]
        recv = [g[1:] for g in got]  # recv[i][l]: rows rank i sends to our l-th expert
        send_splits = [sum(counts[j * local:(j + 1) * local]) for j in range(world)]
        recv_splits = [sum(c) for c in recv]

        # 2. rows out, already grouped by owner rank because experts are contiguous per rank
        scale = float(world) if self.average_expert_grads else 1.0
        inbox = exchange(rows, recv_splits, send_splits, self.group, grad_scale=scale)
        # the inbox is grouped by (source, expert); each expert wants its rows contiguous: (expert, source)
        order = None
        if world > 1 and local > 1:
            key = torch.tensor([l * world + i for i in range(world) for l in range(local)], device=device)
            key = key.repeat_interleave(torch.tensor([n for c in recv for n in c], device=device))
            order = torch.argsort(key, stable=True)
            inbox = inbox[order]

        # 3. local experts on contiguous slices
        per_expert = [sum(c[l] for c in recv) for l in range(local)]
        positions = torch.arange(inbox.shape[0], device=device)
        out = run_slices(inbox, positions, per_expert, run_expert, self.experts.global_ids, list(self.experts))
        if order is not None:
            out = out[torch.argsort(order)]

        # 4. results back to the rows' ranks, in the order they were sent
        return exchange(out, send_splits, recv_splits, self.group, grad_scale=1.0 / scale)

    def loss_routing(self, routing: Routing) -> Routing:
        """The record the aux losses read: the whole group's (``aux_scope="global"``) or this rank's."""
        if self.aux_scope != "global":
            return routing
        self.global_routing = gather_routing(routing, self.rank_tokens, self.group)
        return self.global_routing

    def __repr__(self) -> str:
        ids = self.experts.global_ids
        return (f"expert_parallel(rank={self.rank}/{self.world}, experts={ids[0]}..{ids[-1]}, "
                f"aux_scope={self.aux_scope})")


def _registered_params(module: nn.Module) -> List[tuple]:
    """(owner module, name, parameter) of every parameter registered under ``module``."""
    return [(m, n, p) for m in module.modules() for n, p in m._parameters.items() if p is not None]


def gather_routing(routing: Routing, rank_tokens: Sequence[int],
                   group: Optional[dist.ProcessGroup] = None) -> Routing:
    """The token-choice record of the whole group's batch (ranks' tokens concatenated in rank order), with
    gradients flowing back to every rank's router. Collective: every rank of ``group`` must call it.

    Args:
        routing: this rank's token-choice record (T_r tokens).
        rank_tokens: T_i of every rank i of the group.
    """
    if routing.mode != "token_choice":
        raise ValueError(f"gather_routing needs a token_choice record, got {routing.mode!r}")
    world = len(rank_tokens)
    parts = [routing.logits, routing.probs, routing.weights, routing.indices.to(routing.probs.dtype)]
    noisy = routing.noisy_logits is not routing.logits
    parts += ([routing.noisy_logits] if noisy else []) + ([routing.noise_std] if routing.noise_std is not None else [])
    packed = torch.cat(parts, dim=1)
    # all-gather with uneven sizes = all-to-all of W copies (gloo's all_gather wants equal sizes)
    full = exchange(packed.repeat(world, 1), rank_tokens, [packed.shape[0]] * world, group)
    logits, probs, weights, indices, *rest = full.split([p.shape[1] for p in parts], dim=1)
    noisy_logits = rest.pop(0) if noisy else logits
    noise_std = rest.pop(0) if routing.noise_std is not None else None
    picked = from_picks(indices.round().long(), weights, probs.shape[1], routing.num_experts, routing.hole)
    return Routing.build((logits, noisy_logits, noise_std, probs), picked, routing.num_experts, routing.hole,
                         (int(sum(rank_tokens)),))


def expert_parallel(module: nn.Module, group: Optional[dist.ProcessGroup] = None, aux_scope: str = "global",
                    average_expert_grads: bool = True) -> nn.Module:
    """Shard the experts of every MoEBlock in ``module`` (itself included) over the ranks of ``group``.

    In place, returns ``module``. Call it on every rank of the group, on identically built models: rank r
    keeps experts ``r·E/W … (r+1)·E/W − 1`` (the others are released) and its router and other non-expert
    parameters are broadcast from the group's first rank, so they start replicated.

    Args:
        module: a MoEBlock or a model containing some. Token choice (with or without hole) only.
        group: the expert-parallel process group (default: the world). Recommended: its own group
            (``dist.new_group()``), apart from the one DDP uses.
        aux_scope: ``"global"``: aux losses from the whole group's routing (equal on every rank, equal to
            the single-process losses on the concatenated batch; one extra all-to-all of the (T, ~3E')
            router outputs). ``"local"``: each rank's own tokens only, no communication.
        average_expert_grads: divide the experts' gradients by W (see the module docstring). Turn off if your
            per-rank loss is already the global loss's share (e.g. a sum over all ranks' tokens).
    Raises:
        TypeError: ``module`` is not an nn.Module, ``group`` not a ProcessGroup, ``average_expert_grads``
            not a bool.
        ValueError: expert choice routing, E not divisible by W, an unknown ``aux_scope``, a block already
            sharded (by expert_parallel, or by ``fully_shard``: its parameters are DTensors; shard the experts
            first), no MoEBlock in ``module``, or ``seq_balance`` with ``aux_scope="global"``.
        RuntimeError: torch.distributed is not initialised (checked after the arguments).
    """
    _check_model(module, "module")
    if aux_scope not in AUX_SCOPES:
        raise ValueError(f"aux_scope must be one of {AUX_SCOPES}, got {aux_scope!r}")
    if not isinstance(average_expert_grads, bool):
        raise TypeError(f"average_expert_grads must be True or False, got {average_expert_grads!r}")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    blocks = [m for m in module.modules() if isinstance(m, MoEBlock)]
    if not blocks:
        raise ValueError(f"module contains no MoEBlock to shard ({type(module).__name__})")
    for block in blocks:
        if block.parallel is not None:
            raise ValueError(f"{block.moe_name} is already expert-parallel")
        if block.expert_choice:
            raise ValueError(f"{block.moe_name}: expert parallelism supports token choice only; expert choice "
                             "would need a capacity over the whole group's batch (expert_choice=False)")
        if block.null_experts:
            raise ValueError(f"{block.moe_name}: expert parallelism does not support null_experts (MoE++'s "
                             "zero / copy / constant experts); use null_experts=None")
        if aux_scope == "global" and "seq_balance" in block.aux_weights:
            raise ValueError(f"{block.moe_name}: aux_criterion 'seq_balance' is per sequence and the sequences "
                             "are each rank's own: use aux_scope='local'")
        sharded = [n for n, p in block.named_parameters() if _is_dtensor(p)]
        if sharded:
            raise ValueError(f"{block.moe_name}: its parameters are already sharded DTensors ({sharded[0]}, ...; "
                             "fully_shard or tensor parallelism): call expert_parallel first, then fully_shard "
                             "with ignored_params=sharded_params(model)")
    _check_initialised("expert_parallel")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for block in blocks:
        if block.num_experts % world:
            raise ValueError(f"{block.moe_name}: num_experts={block.num_experts} is not divisible by the "
                             f"group size {world}")
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for block in blocks:
        local = block.num_experts // world
        mine = range(rank * local, (rank + 1) * local)
        if world > 1:
            with torch.no_grad():
                for name, t in [*block.named_parameters(), *block.named_buffers()]:
                    if not name.startswith("experts."):
                        dist.broadcast(t.data, src=src, group=group)
        block.experts = ShardedExperts({e: block.experts[e] for e in mine}, block.num_experts)
        block._looped, block._fused = LoopedExperts(block.experts), None  # let go of the released experts
        block.parallel = ExpertParallelExperts(block.experts, group, rank, world, aux_scope,
                                               bool(average_expert_grads))
        logger.info("%s: rank %d/%d holds experts %d..%d", block.moe_name, rank, world, mine[0], mine[-1])
    # DDP(module) must leave the experts alone: its first broadcast would copy rank 0's experts over the
    # others' and its all-reduce would average different experts' gradients
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(_sharded_names(module))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
    return module


def _sharded_names(model: nn.Module) -> List[str]:
    """Fully qualified names of the parameters and buffers under a :class:`ShardedExperts` of ``model``."""
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, ShardedExperts))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names if n.startswith(prefixes)] if prefixes else []


def _check_model(model, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")


def _check_initialised(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed initialised (dist.init_process_group)")
