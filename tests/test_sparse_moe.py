"""Seed 000's sparsely-gated layer: output and aux loss against a hand computation (Shazeer et al. 2017)."""
import math

import pytest
import torch
import torch.nn.functional as F

from moefy import aux_loss
from moefy.recipes.sparse_moe import MoE


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv2(v):
    mean = sum(v) / len(v)
    return (sum((a - mean) ** 2 for a in v) / len(v)) / (mean ** 2 + 1e-10)


@torch.no_grad()
def by_hand(moe, x, eps, loss_coef):
    """y and aux loss with explicit loops, following the tensor2tensor / davidmrau code."""
    k, num_experts = moe.k, moe.num_experts
    clean = x @ moe.router.gate.weight.T
    std = F.softplus(x @ moe.router.noise_std.weight.T) + 0.01
    noisy = clean + eps * std
    outputs = [expert(x) for expert in moe.experts]
    y, importance, load = torch.zeros_like(outputs[0]), [0.0] * num_experts, [0.0] * num_experts
    for t in range(x.shape[0]):
        order = sorted(range(num_experts), key=lambda e: -float(noisy[t, e]))
        chosen = order[:k]
        gates = torch.softmax(noisy[t, chosen], dim=0)  # softmax over the k chosen logits
        for g, e in zip(gates, chosen):
            y[t] += g * outputs[e][t]
            importance[e] += float(g)
        for e in range(num_experts):
            # in the top k: it stays in if its fresh noisy logit beats the (k+1)-th; else it must beat the k-th
            threshold = float(noisy[t, order[k]]) if e in chosen else float(noisy[t, order[k - 1]])
            load[e] += phi((float(clean[t, e]) - threshold) / float(std[t, e]))
    return y, loss_coef * (cv2(importance) + cv2(load))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_train_forward_and_loss_match_hand_computation(k):
    moe = MoE(input_size=5, output_size=3, num_experts=4, hidden_size=6, k=k, loss_coef=0.1).double()
    with torch.no_grad():  # a non-zero noise weight, so the std differs per token and expert
        moe.router.noise_std.weight.normal_(0, 0.5)
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.manual_seed(123)
    y, loss = moe(x)
    torch.manual_seed(123)
    eps = torch.randn(7, 4, dtype=torch.float64)  # the router's only random draw
    want_y, want_loss = by_hand(moe, x, eps, 0.1)
    torch.testing.assert_close(y, want_y)
    assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-9)
    assert loss is moe.aux_loss and float(aux_loss(moe).detach()) == pytest.approx(want_loss, rel=1e-6)


def test_eval_is_deterministic_and_matches_hand_computation():
    moe = MoE(5, 3, num_experts=4, hidden_size=6, k=2).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    y1, loss1 = moe(x)
    y2, _ = moe(x)
    torch.testing.assert_close(y1, y2)
    want_y, want_loss = by_hand(moe, x, torch.zeros(6, 4, dtype=torch.float64), 1e-2)
    torch.testing.assert_close(y1, want_y)
    assert float(loss1.detach()) == pytest.approx(want_loss, rel=1e-9)


def test_gradients_reach_the_gate_at_k1():
    moe = MoE(8, 4, num_experts=4, hidden_size=16, k=1, loss_coef=0.0)
    x, target = torch.randn(32, 8), torch.randint(0, 4, (32,))
    y, _ = moe(x)
    F.cross_entropy(y, target).backward()  # the task loss alone, no aux loss
    assert moe.router.gate.weight.grad is not None
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert moe.router.noise_std.weight.grad.abs().sum() > 0


def test_no_nan_in_eval_with_zero_gate_and_noise_weights():
    # the seed initialised both gate matrices to zero: all logits tie, the std is softplus(0) + 0.01
    moe = MoE(6, 3, num_experts=5, hidden_size=8, k=2)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
    for mode in (moe.train, moe.eval):
        mode()
        y, loss = moe(torch.randn(10, 6))
        assert torch.isfinite(y).all() and torch.isfinite(loss)


def test_experts_output_logits_not_probabilities():
    moe = MoE(6, 3, num_experts=2, hidden_size=8, k=1).eval()
    x = torch.randn(50, 6) * 3
    out = moe.experts[0](x)
    assert not torch.allclose(out.sum(-1), torch.ones(50))  # no softmax at the end
    assert (out < 0).any()


def test_any_leading_shape_and_seed_defaults():
    moe = MoE(input_size=4, output_size=2, num_experts=6, hidden_size=5)
    assert moe.k == 4 and moe.noisy_gating and moe.aux_weights == {"cv2": 1e-2}
    y, loss = moe(torch.randn(2, 3, 4))
    assert y.shape == (2, 3, 2) and loss.dim() == 0
    assert MoE(4, 2, 3, 5, k=1, noisy_gating=False).router.noise_std is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_size=0), "input_size"), (dict(hidden_size=2.5), "hidden_size"),
    (dict(loss_coef=-1.0), "loss_coef"), (dict(k=7), "k must"),
])
def test_bad_arguments(kwargs, match):
    args = dict(input_size=4, output_size=2, num_experts=6, hidden_size=5) | kwargs
    with pytest.raises(ValueError, match=match):
        MoE(**args)


def test_token_mask_reaches_the_seed_layer():
    import torch
    from moefy.recipes.sparse_moe import MoE

    moe = MoE(8, 3, num_experts=4, hidden_size=16, k=2).eval()
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    y, aux = moe(x, token_mask=mask)
    assert torch.all(y[~mask] == 0) and moe.routing.num_tokens == 4 and torch.isfinite(aux)
