"""A Hugging Face MoE block as a moefy block, and the SwiGLU weights both sides store.

transformers 5 keeps a MoE layer's experts stacked: ``experts.gate_up_proj`` (E, 2H, D) (gate rows first, then
up rows, as its ``chunk(2)``) and ``experts.down_proj`` (E, D, H), the router's ``gate.weight`` (E, D), and a
shared expert as one MLP with ``gate_proj`` / ``up_proj`` / ``down_proj``. moefy keeps one module per expert.
:class:`HFMoEBlock` holds :class:`SwiGLU` experts; :func:`swiglu_weights` reads the weights of any SwiGLU
expert (these, or the ``LlamaMLP`` copies of a moefied Llama); :func:`stack_experts` / :func:`unstack_experts`
convert between the two layouts.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..block import MoEBlock
from ..checks import check_int
from ..config import RoutingConfig
from .families import transformers_module


def activation(name: str) -> nn.Module:
    """transformers' activation module for ``config.hidden_act`` (the same numerics as the HF model)."""
    ACT2FN = transformers_module().activations.ACT2FN
    if not isinstance(name, str) or name not in ACT2FN:
        raise ValueError(f"act must be the name of a transformers activation (config.hidden_act) such as 'silu' "
                         f"or 'gelu', got {name!r}")
    return ACT2FN[name]


class SwiGLU(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: x (..., D) → (..., D), hidden H; no biases (LlamaMLP)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        check_int(dim, "dim", min=1)
        check_int(hidden, "hidden", min=1)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act, self.act_fn = act, activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"act={self.act!r}"


class HFMoEBlock(MoEBlock):
    """A transformers MoE block (``MixtralSparseMoeBlock``, ``DeepseekV3MoE``, ...) as a moefy block, made by
    :func:`moefy.hf.from_hf`: E :class:`SwiGLU` experts, the family's routing as a RoutingConfig, and its shared
    expert (one SwiGLU of its own hidden size) when it has one.

    Args:
        dim: D, the model's hidden size.
        hidden: H, every routed expert's hidden size.
        num_experts: E.
        act: ``config.hidden_act``.
        shared_hidden: the shared expert's hidden size; 0 for none.
        source: the HF block's class name, for export back.
        config: the routing (:meth:`moefy.hf.families.MoEFamily.routing_config`).
    Forward: x (..., D) → (..., D), routed per token.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, act: str, shared_hidden: int = 0,
                 source: str = "", config: Optional[RoutingConfig] = None, **options):
        check_int(num_experts, "num_experts", min=1)
        check_int(shared_hidden, "shared_hidden", min=0)
        experts = [SwiGLU(dim, hidden, act) for _ in range(num_experts)]
        shared = [SwiGLU(dim, shared_hidden, act)] if shared_hidden else None
        super().__init__(experts, dim, config=config, shared_experts=shared, **options)
        self.source = source

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


def swiglu_weights(expert: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate (H, D), up (H, D), down (D, H))`` of a SwiGLU expert: bias-free ``gate_proj`` / ``up_proj`` /
    ``down_proj`` Linears (LlamaMLP, Qwen2MLP, :class:`SwiGLU`); ValueError naming ``name`` otherwise."""
    parts = [getattr(expert, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    for part, module in zip(("gate_proj", "up_proj", "down_proj"), parts):
        linear_weight(module, f"{name}.{part}")  # a PEFT adapter: merge it first
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts) or not hasattr(expert, "act_fn"):
        raise ValueError(f"{name} is a {type(expert).__name__}: Hugging Face MoE experts are SwiGLU MLPs "
                         f"(gate_proj, up_proj, down_proj as bias-free nn.Linear, and act_fn)")
    return tuple(p.weight for p in parts)


def linear_weight(module: Optional[nn.Module], name: str) -> Optional[torch.Tensor]:
    """``module.weight`` (out, in) of an ``nn.Linear`` (a parametrized one gives its computed weight); None for
    anything else, except a PEFT layer (``base_layer``), whose ``weight`` would be the base weight without the
    adapter: ValueError naming ``name`` and ``merge_and_unload``."""
    if module is not None and hasattr(module, "base_layer"):
        raise ValueError(f"{name} is a {type(module).__module__}.{type(module).__qualname__} (a PEFT adapter): its "
                         f"weight without the adapter would be written; merge the adapter first "
                         f"(model = peft_model.merge_and_unload())")
    return module.weight if isinstance(module, nn.Linear) else None


def same_activation(expert: nn.Module, act: str) -> bool:
    """Whether ``expert.act_fn`` computes ``config.hidden_act == act``."""
    want, got = activation(act), expert.act_fn
    return type(got) is type(want) and getattr(got, "approximate", None) == getattr(want, "approximate", None)


def stack_experts(experts: Sequence[nn.Module], name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """E SwiGLU experts → transformers' ``gate_up_proj`` (E, 2H, D) and ``down_proj`` (E, D, H)."""
    weights = [swiglu_weights(e, f"{name}.{i}") for i, e in enumerate(experts)]
    shapes = {tuple(g.shape) for g, _, _ in weights}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the experts have different hidden sizes {sorted(shapes)}; a Hugging Face MoE "
                         f"layer stacks experts of one shape")
    gate_up = torch.stack([torch.cat([g, u]) for g, u, _ in weights])  # (E, 2H, D)
    down = torch.stack([d for _, _, d in weights])                     # (E, D, H)
    return gate_up.detach(), down.detach()


@torch.no_grad()
def unstack_experts(experts: Sequence[nn.Module], gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """transformers' ``gate_up_proj`` (E, 2H, D) and ``down_proj`` (E, D, H) into E SwiGLU experts (in place): the
    inverse of :func:`stack_experts`."""
    hidden = down.shape[-1]
    for e, expert in enumerate(experts):
        expert.gate_proj.weight.copy_(gate_up[e, :hidden])
        expert.up_proj.weight.copy_(gate_up[e, hidden:])
        expert.down_proj.weight.copy_(down[e])


def concat_swiglu(modules: Sequence[nn.Module], name: str, dim: int) -> List[torch.Tensor]:
    """S SwiGLU modules as ONE of their summed hidden sizes (a SwiGLU is a sum over its hidden units):
    ``[gate (ΣH, D), up (ΣH, D), down (D, ΣH)]``; zero-size tensors for no module."""
    weights = [swiglu_weights(m, f"{name}.{j}") for j, m in enumerate(modules)]
    if not weights:
        empty = torch.zeros(0, dim)
        return [empty, empty.clone(), empty.t().clone()]
    return [torch.cat([w[0] for w in weights]).detach(), torch.cat([w[1] for w in weights]).detach(),
            torch.cat([w[2] for w in weights], dim=1).detach()]
