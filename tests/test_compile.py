"""torch.compile(block) works for every routing mode: same outputs and gradients, breaks only at the host sync."""
import pytest
import torch
from torch import nn

from moefy.block import MoEBlock


class MLPMixture(MoEBlock):
    def __init__(self, fused=False, **kwargs):
        experts = [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(4)]
        super().__init__(experts=experts, input_dim=16, fused=fused, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


def test_graph_breaks_are_only_the_data_dependent_counts():
    block = MLPMixture(k=2)
    explained = torch._dynamo.explain(block)(torch.randn(3, 5, 16))
    # bincount's output shape depends on data: dynamo breaks there, once in every frame on the way down
    # (forward, route_rows, the strategy, from_picks) and nowhere else; after from_picks reads the counts to the
    # host (CPU), its last few ops (the counts of the non-finite tokens apart) are one more graph
    assert 1 <= explained.graph_break_count <= 5
    assert all("bincount" in b.reason for b in explained.break_reasons)
    sites = {(b.user_stack[-1].filename, b.user_stack[-1].lineno) for b in explained.break_reasons}
    assert len(sites) == 1 and next(iter(sites))[0].endswith("fastpaths.py")


@pytest.mark.parametrize("fused,options", [(False, dict(k=2)), (True, dict(k=1, hole=True))])
def test_compiled_block_matches_eager(fused, options):
    torch._dynamo.reset()
    block = MLPMixture(fused=fused, **options)
    compiled = torch.compile(block, backend="aot_eager" if fused else "inductor")
    for shape in [(3, 5, 16), (2, 7, 16)]:  # a second shape: no error on recompilation
        x = torch.randn(shape, requires_grad=True)
        want = block(x)
        counts = block.routing.counts
        got = compiled(x)
        assert block.routing.counts == counts  # the compiled call routed the same way
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(want)
        gx_want, gw_want = torch.autograd.grad(want, (x, block.router.gate.weight), g)
        gx, gw = torch.autograd.grad(got, (x, block.router.gate.weight), g)
        torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(expert_choice=True, capacity_factor=1.5, aux_criterion="switch"),
    dict(k=2, hole=True, aggregation="mean", aux_criterion=["z", "entropy", "balance"]),
    dict(k=2, noise="gaussian", aux_criterion="prob"),
    dict(k=1, route="samples"),
])
def test_every_routing_mode_compiles(options):
    torch._dynamo.reset()
    block = MLPMixture(**options).eval()  # eval: no noise, so eager and compiled route alike
    compiled = torch.compile(block, backend="aot_eager")
    x = torch.randn(3, 5, 16, requires_grad=True)
    want, want_aux = block(x), block.aux_loss
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block.aux_loss, want_aux, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    gx_want, = torch.autograd.grad(want, x, g)
    gx, = torch.autograd.grad(got, x, g)
    torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-6)


def test_token_mask_compiles():
    torch._dynamo.reset()
    block = MLPMixture(k=2)
    compiled = torch.compile(block, backend="aot_eager")
    x, mask = torch.randn(2, 6, 16), torch.rand(2, 6) > 0.3
    torch.testing.assert_close(compiled(x, token_mask=mask), block(x, token_mask=mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_experts_with_float32_router(dtype):
    block = MLPMixture(k=2, aux_criterion="switch").to(dtype)
    x = torch.randn(4, 5, 16, dtype=dtype)
    y = block(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert block.routing.logits.dtype == torch.float32 and block.aux_loss.dtype == torch.float32
    ref = MLPMixture(k=2).double()
    ref.load_state_dict({k: v.double() for k, v in block.state_dict().items()})
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=0.05, atol=0.05)
    assert all(p.dtype == dtype for p in block.parameters())
