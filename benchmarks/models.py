"""The layers the benchmarks compare, and the cases they run on.

Every variant maps x (T, d) → (T, d) with the same active FLOPs per token:

- ``floor``: a dense MLP of hidden width k·h, the cost no routed layer can beat by much;
- ``generic``: moefy's MoEBlock, E experts ``Sequential(Linear(d, h), GELU, Linear(h, d))`` run one by one
  (the ``-swiglu`` cases: E SwiGLU experts ``down(silu(gate(x)) * up(x))``, as HF's ``LlamaMLP``; the floor too);
- ``fused``: the same block with ``fused=True`` (one pass per layer over all experts' stacked weights);
- ``mask``: the per-expert boolean-mask loop most small MoE repos use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moefy.block import MoEBlock

VARIANTS = ("floor", "generic", "fused", "mask")


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    dim: int
    hidden: int
    experts: int
    k: int
    skew: float = 1.0  # expert 0's load over the mean load
    latency: bool = False  # eval, no grad, forward only
    expert: str = "mlp"  # or "swiglu"

    def describe(self) -> str:
        text = f"T={self.tokens} d={self.dim} h={self.hidden} E={self.experts} k={self.k}"
        text += f", {self.expert} experts" if self.expert != "mlp" else ""
        return text + (f", expert 0 load {self.skew:g}x mean" if self.skew != 1 else "")


CASES = {c.name: c for c in [
    Case("A", 4096, 512, 1024, 8, 2),
    Case("B", 16384, 256, 512, 16, 1),
    Case("C", 8192, 128, 256, 64, 2),
    Case("A-skewed", 4096, 512, 1024, 8, 2, skew=2.0),
    Case("latency-1", 1, 512, 1024, 8, 2, latency=True),
    Case("latency-8", 8, 512, 1024, 8, 2, latency=True),
    Case("A-swiglu", 4096, 512, 1024, 8, 2, expert="swiglu"),
    Case("C-swiglu", 8192, 128, 256, 64, 2, expert="swiglu"),
]}


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, bias-free, as HF's LlamaMLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, dim, bias=False), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


EXPERTS = {"mlp": mlp, "swiglu": SwiGLU}


class MLPMixture(MoEBlock):
    """A mixture of E MLP (or SwiGLU) experts."""

    def __init__(self, dim: int, hidden: int, num_experts: int, expert: str = "mlp", **routing):
        super().__init__(experts=[EXPERTS[expert](dim, hidden) for _ in range(num_experts)], input_dim=dim,
                         **routing)

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


class MaskLoopMoE(nn.Module):
    """The naive baseline: for every expert, a boolean mask over all tokens, index, run, scatter back."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, expert: str = "mlp"):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(EXPERTS[expert](dim, hidden) for _ in range(num_experts))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        vals = vals / vals.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = idx == e  # (T, k)
            mask = hit.any(-1)
            if mask.any():
                w = (vals * hit).sum(-1, keepdim=True)[mask]
                y[mask] += w * expert(x[mask])
        return y


def build(case: Case, variant: str, seed: int = 0, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """The variant's layer for this case; all mixtures share the same router and expert weights."""
    return _build(case, variant, seed).to(device, dtype)


def _build(case: Case, variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if variant == "floor":
        return EXPERTS[case.expert](case.dim, case.k * case.hidden)
    ref = MLPMixture(case.dim, case.hidden, case.experts, case.expert, k=case.k)
    if case.skew != 1:
        _skew_router(ref.router.gate.weight, case)
    if variant in ("generic", "fused"):
        fused = {"fused": True} if variant == "fused" else {}
        block = MLPMixture(case.dim, case.hidden, case.experts, case.expert, k=case.k, **fused)
        block.load_state_dict(ref.state_dict())
        return block
    if variant == "mask":
        block = MaskLoopMoE(case.dim, case.hidden, case.experts, case.k, case.expert)
        block.gate.weight.data.copy_(ref.router.gate.weight.data)
        block.experts.load_state_dict(ref.experts.state_dict())
        return block
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_input(case: Case, seed: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T, d) standard normal tokens; the last feature is the constant 1 the skewed router keys on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.dim, generator=g)
    x[:, -1] = 1.0
    return x.to(device, dtype)


@torch.no_grad()
def _skew_router(weight: torch.Tensor, case: Case) -> None:
    """Raise expert 0's logit by a constant (through the constant feature) until its load is ``skew`` x mean."""
    x = make_input(case)
    lo, hi = 0.0, 10.0
    for _ in range(30):
        mid = (lo + hi) / 2
        weight[0, -1] = mid
        load = (x @ weight.t()).topk(case.k, dim=-1).indices.eq(0).sum().item()
        lo, hi = (mid, hi) if load < case.skew * case.tokens * case.k / case.experts else (lo, mid)
    weight[0, -1] = (lo + hi) / 2
