"""gradcheck in float64 through router and experts; gradients of idle experts and of the router at k=1."""
import pytest
import torch
from torch.func import functional_call

from conftest import LinearMixture


def gradcheck_block(block, x):
    names = [n for n, p in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in block.parameters()]

    def f(x, *ps):
        return functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(k=1, normalize=False),
    dict(k=2),
    dict(k=2, normalize=False, aggregation="mean"),
    dict(k=3, hole=True),
    dict(k=1, hole=True, normalize=False),
    dict(expert_choice=True, capacity_factor=1.0),
    dict(expert_choice=True, hole=True, k=2),
])
def test_gradcheck_through_router_and_experts(options):
    block = LinearMixture(3, 2, num_experts=3, **options).double()
    gradcheck_block(block, torch.randn(2, 4, 3, dtype=torch.float64))


def test_gradcheck_per_sample_routing():
    block = LinearMixture(3, 2, num_experts=3, k=2, route="samples").double()
    gradcheck_block(block, torch.randn(4, 5, 3, dtype=torch.float64))


@pytest.mark.parametrize("aux", ["entropy", "cv2", "switch", "z", "balance", "prob"])
def test_gradcheck_aux_losses(aux):
    block = LinearMixture(3, 2, num_experts=4, k=2, aux_criterion=aux,
                          noise="gaussian" if aux == "prob" else None).double().eval()
    names = [n for n, _ in block.named_parameters() if n.startswith("router.")]
    params = [p.detach().clone().requires_grad_(True) for p in block.router.parameters()]
    x = torch.randn(16, 3, dtype=torch.float64)

    def f(*ps):
        functional_call(block, dict(zip(names, ps)), (x,))
        return block.aux_loss

    assert torch.autograd.gradcheck(f, tuple(params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_router_gets_gradient_at_k1(normalize):
    block = LinearMixture(4, 3, num_experts=4, k=1, normalize=normalize)
    block(torch.randn(32, 4)).pow(2).sum().backward()
    g = block.router.gate.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_k1_normalized_output_equals_single_expert():
    block = LinearMixture(4, 3, num_experts=4, k=1).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = block(x)
    idx = block.routing.indices[:, 0]
    assert torch.equal(block.routing.weights, torch.ones(20, 1, dtype=torch.float64))  # exactly 1.0
    # each expert on its own tokens, as a batch: BLAS may round a 1-row product differently from a batch
    want = torch.zeros(20, 3, dtype=torch.float64)
    for e in range(4):
        rows = (idx == e).nonzero().squeeze(1)
        want[rows] = block.experts[e](x[rows])
    assert torch.equal(y, want)


def test_idle_expert_gets_zero_not_none_gradients():
    block = LinearMixture(4, 3, num_experts=3, k=1)
    with torch.no_grad():
        block.router.gate.weight.zero_()
        block.router.gate.weight[2].fill_(-100.0)  # expert 2 never wins on positive inputs
    block(torch.rand(10, 4)).sum().backward()
    assert block.routing.counts[2] == 0
    for p in block.experts[2].parameters():
        assert p.grad is not None and torch.all(p.grad == 0)
    for p in block.experts[0].parameters():
        assert p.grad is not None


def test_all_tokens_dropped_still_gives_every_expert_a_gradient():
    block = LinearMixture(4, 3, num_experts=2, k=1, hole=True)
    with torch.no_grad():
        block.router.gate.weight.zero_()
        block.router.gate.weight[2].fill_(100.0)
    y = block(torch.rand(6, 4))
    assert torch.all(y == 0) and int(block.routing.dropped) == 6
    y.sum().backward()
    assert all(p.grad is not None for p in block.experts.parameters())
