"""CUDA paths: the same routing and outputs on a GPU, one host sync per forward, and the grouped-mm fused path.

Skipped where torch sees no CUDA device (CI has none); run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from moefy.block import MoEBlock

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Mixture(MoEBlock):
    def __init__(self, experts, input_dim, **kwargs):
        super().__init__(experts=experts, input_dim=input_dim, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


def mlps(n, d=64, h=128):
    return [nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for _ in range(n)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm()).item()


@pytest.mark.parametrize("options", [dict(k=2), dict(k=1), dict(k=2, hole=True), dict(k=2, aggregation="mean"),
                                     dict(k=2, expert_choice=True, capacity_factor=1.25),
                                     dict(k=2, hole=True, null_experts={"copy": 1, "constant": 2, "zero": 1})])
def test_cuda_float32_matches_cpu_float64(options):
    torch.manual_seed(0)
    ref = Mixture(mlps(6), 64, **options).double()
    gpu = copy.deepcopy(ref).float().cuda()
    x = torch.randn(4, 50, 64, dtype=torch.float64)
    y_ref = ref(x)
    y = gpu(x.float().cuda())  # tf32 matmuls are off by default in torch
    assert gpu.routing.counts == ref.routing.counts
    assert int(gpu.routing.dropped) == int(ref.routing.dropped)
    assert rel_err(y, y_ref) < 1e-5
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g.float().cuda())
    for (name, p_ref), p in zip(ref.named_parameters(), gpu.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-4, name


def grouped_mm_here() -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.parametrize("options,dtype,syncs", [
    (dict(k=2), torch.float32, 1),
    (dict(k=2, aggregation="mean", aux_criterion=["switch", "z"]), torch.float32, 1),
    (dict(k=1, fused=True), torch.float32, 1),  # fused, but no grouped mm in float32: counts for the loop
    (dict(k=2, fused=True, hole=True), torch.bfloat16, 1),  # the hole's tail is cut with host counts
    (dict(k=2, fused=True, aux_criterion="switch"), torch.bfloat16, 0),  # grouped mm: no host counts at all
])
def test_host_syncs_per_forward_and_backward(options, dtype, syncs):
    if syncs == 0 and not grouped_mm_here():
        pytest.skip("grouped mm needs compute capability >= 9.0")
    block = Mixture(mlps(8), 64, **options).to("cuda", dtype)
    x = torch.randn(256, 64, device="cuda", dtype=dtype)
    block(x)  # warm up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block(x).float().sum().add(block.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(found) == syncs, found
    r = block.routing  # the host counts are read back on demand
    assert sum(r.counts[:block.num_experts]) + int(r.dropped) == 256 * block.k


def test_grouped_mm_gives_idle_experts_zero_gradients():
    if not grouped_mm_here():
        pytest.skip("grouped mm needs compute capability >= 9.0")
    block = Mixture(mlps(4), 64, k=1, fused=True).to("cuda", torch.bfloat16)
    with torch.no_grad():  # every token to expert 2
        block.router.gate.weight.zero_()
        block.router.gate.weight[2, 0] = 5.0
    x = torch.rand(32, 64, device="cuda", dtype=torch.bfloat16) + 1
    block(x).float().sum().backward()
    assert block.routing.counts == (0, 0, 32, 0)
    for e in (0, 1, 3):
        for p in block.experts[e].parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(block.experts[2][0].weight.grad) > 0


class SwiGLU(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj, self.act_fn = nn.Linear(h, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# experts, and the grouped mms one fused forward runs: two Linears, or SwiGLU's gate, up and down (HF's LlamaMLP)
EXPERTS = {"mlp": (lambda: mlps(8), 2), "swiglu": (lambda: [SwiGLU() for _ in range(8)], 3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", EXPERTS)
def test_fused_matches_generic_on_cuda(kind, dtype, monkeypatch):
    torch.manual_seed(0)
    make, linears = EXPERTS[kind]
    generic = Mixture(make(), 64, k=2).to("cuda", dtype)
    fused = Mixture(copy.deepcopy(list(generic.experts)), 64, k=2, fused=True).to("cuda", dtype)
    fused.load_state_dict(generic.state_dict())
    calls = []
    if hasattr(torch, "_grouped_mm"):
        real = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(512, 64, device="cuda", dtype=dtype)
    y_g, y_f = generic(x), fused(x)
    assert fused.routing.counts == generic.routing.counts
    grouped = dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)
    assert len(calls) == (linears if grouped else 0)  # auto picks grouped mm exactly where it has a fast kernel
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(y_f, y_g) < tol
    g = torch.randn_like(y_g)
    y_g.backward(g)
    y_f.backward(g)
    for (name, p_g), p_f in zip(generic.named_parameters(), fused.parameters()):
        assert rel_err(p_f.grad, p_g.grad) < tol * 2, name


def test_fused_grouped_forward_compiles_to_one_graph_with_cuda_graphs():
    if not grouped_mm_here():
        pytest.skip("grouped mm needs compute capability >= 9.0")
    torch.manual_seed(0)
    block = Mixture(mlps(8), 64, k=2, fused=True).to("cuda", torch.bfloat16)
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)  # fullgraph: no break, no sync
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3):  # warm-up runs, then CUDA graph replays
        torch.compiler.cudagraph_mark_step_begin()
        for p in block.parameters():
            p.grad = None
        x.grad = None
        y = compiled(x)
        y.float().sum().backward()
    got_y, got_grad = y.detach().clone(), block.experts[0][0].weight.grad.clone()
    counts = block.routing.counts
    for p in block.parameters():
        p.grad = None
    want = block(x)
    want.float().sum().backward()
    assert block.routing.counts == counts
    assert rel_err(got_y, want) < 2e-2
    assert rel_err(got_grad, block.experts[0][0].weight.grad) < 2e-2
