"""Fused and generic dispatch give the same outputs and gradients; fast top-k equals topk."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moefy.block import MoEBlock
from moefy.dispatch.fused import _LoopedLinear, _looped_linear, fused_experts_forward, fused_layout
from moefy.fastpaths import linear as _linear
from moefy.fastpaths import top_k


class Mixture(MoEBlock):
    def __init__(self, experts, input_dim, **kwargs):
        super().__init__(experts=experts, input_dim=input_dim, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


def mlps(n, d=8, h=12, act=nn.GELU):
    return [nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, d)) for _ in range(n)]


def pair(experts, dtype=torch.float64, **kwargs):
    """A generic and a fused block with the same weights."""
    generic = Mixture(experts, experts[0][0].in_features if isinstance(experts[0], nn.Sequential)
                      else experts[0].in_features, **kwargs).to(dtype)
    fused = Mixture(copy.deepcopy(list(generic.experts)), generic.input_dim, fused=True, **kwargs).to(dtype)
    fused.load_state_dict(generic.state_dict())
    assert not set(map(id, fused.parameters())) & set(map(id, generic.parameters()))
    return generic, fused


def grads(block):
    return {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("options", [
    dict(k=2), dict(k=1), dict(k=3, normalize=False), dict(k=2, hole=True), dict(k=2, aggregation="mean"),
    dict(k=2, expert_choice=True, capacity_factor=1.5), dict(k=1, noise="gaussian", aux_criterion="cv2"),
])
def test_fused_matches_generic_outputs_and_gradients(options):
    generic, fused = pair(mlps(5), **options)
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    torch.manual_seed(1)
    yg = generic(x)
    torch.manual_seed(1)  # same noise draw
    yf = fused(x)
    torch.testing.assert_close(yf, yg, rtol=0, atol=1e-12)
    assert fused.routing.counts == generic.routing.counts
    grad = torch.randn_like(yg)
    (yg * grad).sum().add(generic.aux_loss).backward()
    (yf * grad).sum().add(fused.aux_loss).backward()
    gg, gf = grads(generic), grads(fused)
    assert gg.keys() == gf.keys()
    for name in gg:
        torch.testing.assert_close(gf[name], gg[name], rtol=0, atol=1e-12, msg=name)


def test_fused_linear_experts_and_relu_stack_float32():
    generic, fused = pair([nn.Linear(8, 4) for _ in range(3)], dtype=torch.float32, k=2)
    x = torch.randn(30, 8)
    torch.testing.assert_close(fused(x), generic(x))
    deep = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 8))
            for _ in range(4)]
    generic, fused = pair(deep, dtype=torch.float32, k=2)
    torch.testing.assert_close(fused(x), generic(x))


def test_idle_experts_get_zero_gradients_in_fused_mode():
    generic, fused = pair(mlps(4), k=1)
    with torch.no_grad():  # every token to expert 2
        for b in (generic, fused):
            b.router.gate.weight.zero_()
            b.router.gate.weight[2, 0] = 5.0
    x = torch.rand(6, 8, dtype=torch.float64) + 1
    fused(x).sum().backward()
    generic(x).sum().backward()
    assert fused.routing.counts == (0, 0, 6, 0)
    for e in (0, 1, 3):
        for p in fused.experts[e].parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    torch.testing.assert_close(fused.experts[2][0].weight.grad, generic.experts[2][0].weight.grad)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_backends_equal_a_per_expert_loop(backend):
    experts = mlps(4, d=8, h=16)
    counts = (5, 0, 7, 3)
    expert_index = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    x = torch.randn(sum(counts), 8, requires_grad=True)
    want = torch.cat([experts[e](row[None]) for e, row in zip(expert_index.tolist(), x)])
    got = fused_experts_forward(experts, fused_layout(experts), x, counts, expert_index, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    gx_want, gw_want = torch.autograd.grad(want, (x, experts[2][2].weight), g)
    gx, gw = torch.autograd.grad(got, (x, experts[2][2].weight), g)
    torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_want, rtol=1e-5, atol=1e-5)


def test_grouped_backend_refuses_float64_and_unknown_backend():
    experts = [nn.Linear(8, 8).double() for _ in range(2)]
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="grouped"):
        fused_experts_forward(experts, fused_layout(experts), x, (1, 2), torch.tensor([0, 1, 1]), backend="grouped")
    with pytest.raises(ValueError, match="backend"):
        fused_experts_forward(experts, fused_layout(experts), x, (1, 2), torch.tensor([0, 1, 1]), backend="bmm")


def test_fused_layout_recognises_only_plain_homogeneous_experts():
    assert fused_layout(mlps(3)) == (("linear", 0), ("act", 1), ("linear", 2))
    assert fused_layout([nn.Linear(4, 4) for _ in range(2)]) == (("linear", 0),)
    assert fused_layout(mlps(2, h=12) + mlps(1, h=16)) is None  # different hidden sizes
    assert fused_layout([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)]) is None
    assert fused_layout(mlps(2, act=nn.GELU) + mlps(1, act=nn.ReLU)) is None
    assert fused_layout([nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Sequential(nn.Linear(4, 4),
                                                                                    nn.GELU("tanh"))]) is None
    hooked = mlps(2)
    hooked[1][0].register_forward_hook(lambda m, i, o: o * 2)
    assert fused_layout(hooked) is None
    with pytest.raises(ValueError, match="fused=True"):
        Mixture(hooked, 8, fused=True)
    with pytest.raises(TypeError, match="fused"):
        Mixture(mlps(2), 8, fused="yes")


def test_side_inputs_run_unfused():
    class Scaled(MoEBlock):
        calls = 0

        def expert_forward(self, expert, x, scale=1.0):
            Scaled.calls += 1
            return expert(x) * scale

    block = Scaled(experts=mlps(3), input_dim=8, k=1, fused=True)
    x = torch.randn(10, 8)
    y1 = block(x)
    assert Scaled.calls == 0  # fused: expert_forward never called
    y2 = block(x, scale=2.0)
    assert Scaled.calls == sum(1 for n in block.routing.counts if n)
    torch.testing.assert_close(y2, 2 * y1)


@pytest.mark.parametrize("tokens,columns,k", [(512, 16, 2), (300, 64, 3), (2048, 8, 4), (5, 4, 2), (700, 9, 1)])
def test_top_k_equals_torch_topk(tokens, columns, k):
    probs = torch.randn(tokens, columns).softmax(-1).requires_grad_(True)
    vals, idx = top_k(probs, k)
    want_vals, want_idx = probs.topk(k, dim=-1)
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals, want_vals)
    g = torch.randn_like(vals)
    torch.testing.assert_close(torch.autograd.grad(vals, probs, g)[0], torch.autograd.grad(want_vals, probs, g)[0])


@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_few_row_linear_equals_f_linear(rows):
    lin = nn.Linear(512, 512).double()  # 2**18 weights: big enough for the transposed few-row product
    x = torch.randn(rows, 512, dtype=torch.float64, requires_grad=True)
    got, want = _linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias)
    assert got.is_contiguous() == (not 2 <= rows <= 16)  # W @ x.T exactly for 2..16 rows
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, lin.weight, lin.bias), g),
                    torch.autograd.grad(want, (x, lin.weight, lin.bias), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_looped_linear_gradcheck(bias):
    """The slice-by-slice Function against finite differences (twice), an idle slice included."""
    sizes = [3, 0, 4, 2]
    x = torch.randn(sum(sizes), 5, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in sizes]
    biases = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in sizes] if bias else []
    assert torch.autograd.gradcheck(lambda x, *p: _LoopedLinear.apply(x, sizes, *p), (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(lambda x, *p: _LoopedLinear.apply(x, sizes, *p), (x, *weights, *biases))
    want = torch.cat([F.linear(x_e, w, b) for x_e, w, b in
                      zip(x.split(sizes), weights, biases or [None] * len(sizes))])
    torch.testing.assert_close(_LoopedLinear.apply(x, sizes, *weights, *biases), want, rtol=0, atol=1e-12)


def test_looped_linear_frozen_weights_and_no_grad_agree():
    linears = [nn.Linear(4, 3).double() for _ in range(3)]
    linears[1].weight.requires_grad_(False)  # a frozen expert weight gets no gradient, the rest do
    sizes = [20, 33, 1]  # more than 16 rows per expert: eval also writes slices instead of cat
    x = torch.randn(54, 4, dtype=torch.float64, requires_grad=True)
    y = _looped_linear(x, linears, sizes)
    y.sum().backward()
    assert linears[1].weight.grad is None and linears[1].bias.grad is not None
    torch.testing.assert_close(linears[0].weight.grad, torch.ones(3, 20, dtype=torch.float64) @ x[:20].detach())
    torch.testing.assert_close(linears[2].bias.grad, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(x.grad[20:53], torch.ones(33, 3, dtype=torch.float64) @ linears[1].weight)
    with torch.no_grad():
        torch.testing.assert_close(_looped_linear(x, linears, sizes), y, rtol=0, atol=0)
        few = torch.cat([F.linear(x_e, l.weight, l.bias) for x_e, l in zip(x[:8].split([2, 5, 1]), linears)])
        torch.testing.assert_close(_looped_linear(x[:8], linears, [2, 5, 1]), few, rtol=0, atol=0)


def test_fused_under_autocast_matches_generic_dtype():
    generic, fused = pair(mlps(4), dtype=torch.float32, k=2)
    x = torch.randn(40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yg, yf = generic(x), fused(x)
    assert yf.dtype == yg.dtype
    torch.testing.assert_close(yf, yg)
