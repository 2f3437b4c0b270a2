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
                                     dict(k=2, expert_choice=True, capacity_factor=1.25)])
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


@pytest.mark.parametrize("options", [dict(k=2), dict(k=2, aggregation="mean", aux_criterion=["switch", "z"]),
                                     dict(k=1, fused=True)])
def test_one_host_sync_per_token_choice_forward(options):
    block = Mixture(mlps(8), 64, **options).cuda()
    x = torch.randn(256, 64, device="cuda")
    block(x)  # warm up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_matches_generic_on_cuda(dtype, monkeypatch):
    torch.manual_seed(0)
    generic = Mixture(mlps(8), 64, k=2).to("cuda", dtype)
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
    assert bool(calls) == grouped  # auto picks grouped mm exactly where it has a fast kernel
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(y_f, y_g) < tol
    g = torch.randn_like(y_g)
    y_g.backward(g)
    y_f.backward(g)
    for (name, p_g), p_f in zip(generic.named_parameters(), fused.parameters()):
        assert rel_err(p_f.grad, p_g.grad) < tol * 2, name
