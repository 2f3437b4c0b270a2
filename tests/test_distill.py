"""MoDE's mutual distillation loss against seed 003's double loop over expert pairs."""
import pytest
import torch
import torch.nn.functional as F

from conftest import LinearMixture
from moefy.recipes.distill import (block_distillation_loss, expert_logits, mode_loss,
                                   mutual_distillation_loss)


def double_loop(outputs, gates, temperature):
    """Seed 003's compute_distillation_loss, written out."""
    num_experts, loss = len(outputs), 0.0
    for i in range(num_experts):
        for j in range(num_experts):
            if i != j:
                soft_targets = F.softmax(outputs[j].detach() / temperature, dim=1)
                log_probs = F.log_softmax(outputs[i] / temperature, dim=1)
                kl = F.kl_div(log_probs, soft_targets, reduction="batchmean")
                loss = loss + kl * gates[:, i].mean()
    return loss / (num_experts * (num_experts - 1)) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_equals_double_loop_over_expert_pairs(temperature):
    logits = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(6, 4, dtype=torch.float64).softmax(-1)
    got = mutual_distillation_loss(logits, gates, temperature)
    want = double_loop(list(logits), gates, temperature)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want)


def test_two_experts_by_hand():
    # one sample, two classes: p_0 = softmax([0, 0]) = (.5, .5), p_1 = softmax([ln 3, 0]) = (.75, .25), T = 1
    logits = torch.tensor([[[0.0, 0.0]], [[torch.log(torch.tensor(3.0)), 0.0]]], dtype=torch.float64)
    gates = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    kl_1_into_0 = 0.75 * torch.log(torch.tensor(0.75 / 0.5)) + 0.25 * torch.log(torch.tensor(0.25 / 0.5))
    kl_0_into_1 = 0.5 * torch.log(torch.tensor(0.5 / 0.75)) + 0.5 * torch.log(torch.tensor(0.5 / 0.25))
    want = (0.4 * kl_1_into_0 + 0.6 * kl_0_into_1) / 2
    assert float(mutual_distillation_loss(logits, gates, temperature=1.0)) == pytest.approx(float(want))


def test_identical_experts_or_one_expert_give_zero():
    same = torch.randn(1, 8, 3).expand(3, 8, 3)
    assert float(mutual_distillation_loss(same, torch.rand(8, 3))) == pytest.approx(0.0, abs=1e-6)
    assert float(mutual_distillation_loss(torch.randn(1, 8, 3), torch.rand(8, 1))) == 0.0


def test_any_leading_shape():
    logits = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    gates = torch.rand(2, 4, 3, dtype=torch.float64)
    flat = mutual_distillation_loss(logits.reshape(3, 8, 5), gates.reshape(8, 3))
    torch.testing.assert_close(mutual_distillation_loss(logits, gates), flat)


def test_block_loss_uses_every_expert_on_every_token():
    block = LinearMixture(4, 3, num_experts=3, k=1).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    block(x)
    dense = expert_logits(block, x)
    assert dense.shape == (3, 2, 5, 3)
    torch.testing.assert_close(dense[1], block.experts[1](x))
    want = double_loop(list(dense.reshape(3, 10, 3)), block.routing.probs, 2.0)
    loss = block_distillation_loss(block, x)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(e.weight.grad.abs().sum() > 0 for e in block.experts)


def test_mode_loss_mix():
    assert float(mode_loss(torch.tensor(2.0), torch.tensor(4.0), alpha=0.25)) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="alpha"):
        mode_loss(torch.tensor(1.0), torch.tensor(1.0), alpha=1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="gates"):
        mutual_distillation_loss(torch.randn(3, 4, 2), torch.rand(4, 2))
    with pytest.raises(ValueError, match="expert_logits"):
        mutual_distillation_loss(torch.randn(4, 2), torch.rand(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        mutual_distillation_loss(torch.randn(3, 4, 2), torch.rand(4, 3), temperature=0)
    block = LinearMixture(4, 3, num_experts=3)
    block(torch.randn(6, 4))
    with pytest.raises(ValueError, match="call block"):
        block_distillation_loss(block, torch.randn(5, 4))
