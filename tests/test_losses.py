"""Each auxiliary loss against its paper's formula on a hand-made routing, and its balanced value."""
import math

import pytest
import torch

from moefy import MoEBlock, Routing
from moefy.routing.losses import (balance_loss, cv2_loss, cv_squared, entropy_loss, importance, prob_loss,
                                  smooth_load, switch_loss, z_loss)
from moefy.config import RoutingConfig
from moefy.routing.select import token_choice


def routing(logits, k=1, noise_std=None, noisy=None):
    logits = torch.as_tensor(logits, dtype=torch.float64)
    noisy = logits if noisy is None else torch.as_tensor(noisy, dtype=torch.float64)
    probs = noisy.softmax(-1)
    picked = token_choice(probs, RoutingConfig(k=k), logits.shape[1])
    count = torch.bincount(picked.expert_index, minlength=logits.shape[1])
    assert torch.equal(picked.count, count)
    return Routing("token_choice", logits.shape[1], False, logits, noisy, noise_std, probs, picked.indices,
                   picked.weights, picked.token_index, picked.expert_index, picked.weight, count,
                   (logits.shape[0],), torch.tensor(0))


LOGITS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.5]]


def test_cv_squared_population_variance():
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(1.0 / 4.0)
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0


def test_switch_loss_formula_and_balanced_value():
    r = routing(LOGITS)
    p = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1)
    f = torch.tensor([2, 1, 1], dtype=torch.float64) / 4  # argmax per token: 0, 1, 0, 2
    assert r.counts == (2, 1, 1)
    assert float(switch_loss(r)) == pytest.approx(3 * float((f * p.mean(0)).sum()))
    balanced = routing([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # f = 1/3 each, mean probs = 1/3 each -> E * sum(1/3 * 1/3) = 1
    assert float(switch_loss(balanced)) == pytest.approx(1.0)


def test_z_loss_formula():
    r = routing(LOGITS)
    want = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / 4
    assert float(z_loss(r)) == pytest.approx(want)


def test_entropy_loss_is_log_e_minus_entropy_of_mean_probs():
    r = routing(LOGITS)
    pbar = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1).mean(0)
    want = math.log(3) + sum(float(q) * math.log(float(q)) for q in pbar)
    assert float(entropy_loss(r)) == pytest.approx(want)
    assert float(entropy_loss(routing([[0.0, 0.0, 0.0]] * 5))) == pytest.approx(0.0, abs=1e-12)


def test_balance_loss_penalises_distance_from_uniform():
    r = routing([[math.log(3.0), 0.0]] * 4)  # probs 0.75 / 0.25 for every token
    assert float(balance_loss(r)) == pytest.approx(2 * (0.25 ** 2 + 0.25 ** 2))
    assert float(balance_loss(routing([[0.0, 0.0]] * 3))) == pytest.approx(0.0, abs=1e-12)


def test_cv2_is_importance_plus_load():
    r = routing(LOGITS, k=2)
    p = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1)
    top = p.topk(2, dim=-1)
    gates = torch.zeros_like(p).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    imp, load = gates.sum(0), (gates > 0).double().sum(0)
    want = imp.var(unbiased=False) / imp.mean() ** 2 + load.var(unbiased=False) / load.mean() ** 2
    torch.testing.assert_close(importance(r), imp)
    assert float(cv2_loss(r)) == pytest.approx(float(want))
    balanced = routing([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], k=1)
    assert float(cv2_loss(balanced)) == pytest.approx(0.0, abs=1e-9)


def test_smooth_load_is_shazeers_estimator():
    torch.manual_seed(0)
    clean = torch.randn(6, 4, dtype=torch.float64)
    std = torch.rand(6, 4, dtype=torch.float64) + 0.1
    noisy = clean + torch.randn(6, 4, dtype=torch.float64) * std
    k = 2
    r = routing(clean, k=k, noise_std=std, noisy=noisy)
    want = torch.zeros(4, dtype=torch.float64)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    for t in range(6):
        for e in range(4):
            others = sorted((float(noisy[t, j]) for j in range(4) if j != e), reverse=True)
            kth_excluding = others[k - 1]
            want[e] += phi((float(clean[t, e]) - kth_excluding) / float(std[t, e]))
    torch.testing.assert_close(smooth_load(r), want)
    assert float(prob_loss(r)) == pytest.approx(float(cv_squared(want)))


def test_prob_loss_finite_in_eval_and_zero_init_noise():
    class M(MoEBlock):
        def __init__(self):
            super().__init__([torch.nn.Linear(4, 4) for _ in range(4)], 4, k=2, noise="gaussian",
                             aux_criterion="prob")

        def expert_forward(self, e, x):
            return e(x)

    m = M().eval()
    m(torch.randn(32, 4))
    assert torch.isfinite(m.aux_loss) and float(m.aux_loss.detach()) >= 0
