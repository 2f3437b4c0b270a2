"""Aux-loss-free load balancing (Wang et al. 2024, DeepSeek-V3): ``bias_update_rate`` and
``moefy.routing.update_selection_bias``. Hand-computed updates, the counts' lifecycle (training forwards only,
all micro-batches, reset after an update, not in the state dict), the bias in the state dict, and a skewed
router balanced by the bias update alone.
"""
import pytest
import torch
from torch import nn

from conftest import LinearMixture
from moefy import RoutingConfig
from moefy.routing import BiasBalance, bias_update, update_selection_bias

RATE = 0.01


def test_single_update_by_hand():
    # counts (E=4) 10, 2, 4, 4 → mean 5 → errors -5, 3, 1, 1 → signs -1, +1, +1, +1
    bias = torch.tensor([0.5, 0.0, -0.2, 0.1])
    new = bias_update(bias, torch.tensor([10, 2, 4, 4]), 0.1)
    torch.testing.assert_close(new, torch.tensor([0.4, 0.1, -0.1, 0.2]))
    assert torch.equal(bias, torch.tensor([0.5, 0.0, -0.2, 0.1]))  # a new tensor
    # an expert exactly at the mean keeps its bias: counts 6, 3, 3 → mean 4 → -1, +1, +1; 4, 4, 4 → no move
    torch.testing.assert_close(bias_update(torch.zeros(3), torch.tensor([6, 3, 3]), 0.5), torch.tensor([-.5, .5, .5]))
    assert torch.equal(bias_update(torch.ones(3), torch.tensor([4, 4, 4]), 0.5), torch.ones(3))


def _block(**kw):
    return LinearMixture(4, 3, 4, k=2, selection_bias=True, bias_update_rate=RATE, **kw)


def test_block_update_from_the_forwards_counts():
    block = _block()
    x1, x2 = torch.randn(6, 4), torch.randn(5, 4)
    block(x1)
    c1 = block.routing.count.clone()
    block(x2)  # a second micro-batch: both count
    c2 = block.routing.count.clone()
    assert torch.equal(block.bias_balance.counts, c1 + c2) and int((c1 + c2).sum()) == 22
    bias0 = block.router.score_correction_bias.clone()
    used = update_selection_bias(nn.Sequential(block))
    assert list(used) == ["0"] and torch.equal(used["0"], c1 + c2)
    total = (c1 + c2).double()
    torch.testing.assert_close(block.router.score_correction_bias,
                               bias0 + RATE * (total.mean() - total).sign().float())
    assert torch.equal(block.bias_balance.counts, torch.zeros(4, dtype=torch.long))  # reset
    # no forward since: all counts zero → every expert at the mean → the bias stays
    bias1 = block.router.score_correction_bias.clone()
    update_selection_bias(block)
    assert torch.equal(block.router.score_correction_bias, bias1)


def test_eval_forwards_count_nothing_and_never_move_the_bias():
    block = _block().eval()
    with torch.no_grad():
        block.router.score_correction_bias.copy_(torch.tensor([0.3, -0.1, 0.0, 0.2]))
    for _ in range(3):
        block(torch.randn(8, 4))
    assert int(block.bias_balance.counts.sum()) == 0
    assert torch.equal(block.router.score_correction_bias, torch.tensor([0.3, -0.1, 0.0, 0.2]))
    assert update_selection_bias(block)[""].sum() == 0
    assert torch.equal(block.router.score_correction_bias, torch.tensor([0.3, -0.1, 0.0, 0.2]))


def test_bias_is_saved_and_loaded_the_counts_are_not():
    block = _block()
    block(torch.randn(10, 4))
    update_selection_bias(block)
    block(torch.randn(10, 4))
    state = block.state_dict()
    assert "router.score_correction_bias" in state and not any("bias_balance" in k for k in state)
    fresh = _block()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.score_correction_bias, block.router.score_correction_bias)
    assert fresh.router.score_correction_bias.abs().sum() > 0
    assert int(fresh.bias_balance.counts.sum()) == 0


def test_hole_column_is_neither_counted_nor_moved_and_capacity_counts_the_picks():
    block = LinearMixture(4, 3, 3, k=2, hole=True, selection_bias=True, bias_update_rate=RATE,
                          token_capacity_factor=0.5)
    with torch.no_grad():  # most picks to expert 0 and the hole
        block.router.gate.weight.zero_()
        block.router.gate.weight[0, 0] = block.router.gate.weight[3, 0] = 5.0
    x = torch.randn(20, 4).abs()
    block(x)
    r = block.routing
    assert int(r.dropped) > int(r.count[3])  # capacity dropped some picks of expert 0
    assert torch.equal(block.bias_balance.counts, r.picked_count[:3])
    picked = r.picked_count[:3].double()
    update_selection_bias(block)
    bias = block.router.score_correction_bias
    torch.testing.assert_close(bias[:3], RATE * (picked.mean() - picked).sign().float())
    assert bias[3] == 0


def test_masked_tokens_count_nowhere():
    block = _block()
    mask = torch.tensor([True, False, True, False, False])
    block(torch.randn(5, 4), token_mask=mask)
    assert int(block.bias_balance.counts.sum()) == 2 * 2


def test_skewed_router_is_balanced_by_the_bias_update_alone():
    torch.manual_seed(0)
    experts, dim = 8, 16
    block = LinearMixture(dim, dim, experts, k=2, score_func="sigmoid", selection_bias=True, bias_update_rate=2e-3)
    with torch.no_grad():  # one large router column: expert 0 wins almost every token
        block.router.gate.weight.normal_(0, 0.1)
        block.router.gate.weight[0] += 1.0
    mean_dir = torch.ones(dim) / dim ** 0.5

    def batch(n=1024):
        return torch.randn(n, dim) * 0.5 + mean_dir * 2

    def max_over_mean():
        with torch.no_grad():
            block.eval()
            block(batch(4096))  # large enough that sampling noise stays well under 1.2
            block.train()
        count = block.routing.count.double()
        return float(count.max() / count.mean())

    start = max_over_mean()
    with torch.no_grad():  # no gradient, no loss: only the bias moves
        for _ in range(600):
            block(batch())
            update_selection_bias(block)
    end = max_over_mean()
    assert start > 2 and end < 1.2, (start, end)
    bias = block.router.score_correction_bias
    assert bias[0] == bias.min() and bias[0] < 0  # the favoured expert was pushed down


def test_training_with_a_task_loss_accumulated_micro_batches_and_an_optimizer():
    torch.manual_seed(0)
    dim = 16
    block = LinearMixture(dim, dim, 8, k=2, score_func="sigmoid", selection_bias=True, bias_update_rate=2e-3)
    with torch.no_grad():
        block.router.gate.weight.normal_(0, 0.1)
        block.router.gate.weight[0] += 1.0
    teacher = nn.Linear(dim, dim).requires_grad_(False)
    opt = torch.optim.SGD(block.parameters(), lr=0.05)

    def batch(n):
        return torch.randn(n, dim) * 0.5 + 0.5

    def max_over_mean():
        with torch.no_grad():
            block.eval()
            block(batch(4096))
            block.train()
        count = block.routing.count.double()
        return float(count.max() / count.mean())

    start = max_over_mean()
    for _ in range(300):
        for _ in range(2):  # gradient accumulation: both micro-batches count in the update
            x = batch(256)
            (block(x) - teacher(x)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        used = update_selection_bias(block)
    assert int(used[""].sum()) == 2 * 256 * 2
    end = max_over_mean()
    assert start > 2 and end < 1.2, (start, end)


def test_config_needs_selection_bias_and_a_rate_of_at_least_zero():
    assert RoutingConfig().bias_update_rate == 0.0
    assert RoutingConfig(selection_bias=True, bias_update_rate=1).bias_update_rate == 1.0
    with pytest.raises(ValueError, match=r"bias_update_rate=0.1 .* needs selection_bias=True"):
        RoutingConfig(bias_update_rate=0.1)
    with pytest.raises(ValueError, match=r"bias_update_rate must be a number >= 0 \(0 is off\), got -1"):
        RoutingConfig(selection_bias=True, bias_update_rate=-1)
    assert LinearMixture(4, 3, 4, selection_bias=True).bias_balance is None
    assert "bias_update_rate=0.01" in repr(_block())
    assert update_selection_bias(LinearMixture(4, 3, 4)) == {}


def test_bias_balance_refuses_bad_input():
    with pytest.raises(ValueError, match="num_experts must be"):
        BiasBalance(0, 0.1)
    with pytest.raises(ValueError, match="rate must be"):
        BiasBalance(3, 0.0)
    with pytest.raises(TypeError, match="r must be a Routing"):
        BiasBalance(3, 0.1).add("routing")
    with pytest.raises(ValueError, match="must both have shape"):
        bias_update(torch.zeros(3), torch.zeros(4), 0.1)
