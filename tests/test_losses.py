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


# ----------------------------------------------------------------- seq_balance (DeepSeek-V3 eq. 17-20)
import dataclasses

from conftest import LinearMixture
from moefy.routing.losses import GlobalBalance, global_switch_loss, reset_global_balance, seq_balance_loss


def seq_routing(logits, tokens_shape, k=1, kept=None, sigmoid=False):
    logits = torch.as_tensor(logits, dtype=torch.float64)
    probs = logits.sigmoid() if sigmoid else logits.softmax(-1)
    picked = token_choice(probs, RoutingConfig(k=k), logits.shape[1])
    return Routing("token_choice", logits.shape[1], False, logits, logits, None, probs, picked.indices,
                   picked.weights, picked.token_index, picked.expert_index, picked.weight, picked.count,
                   tuple(tokens_shape), torch.tensor(0), kept=kept)


def seq_balance_by_hand(probs, sequences, k):
    """Eq. 17-20 with loops: per sequence (a list of row ids), f_i = E/(kL) #{t: i in topk(t)},
    P_i = mean_t s'_{i,t}; the mean over sequences that have rows."""
    probs = probs / probs.sum(-1, keepdim=True)
    top = probs.topk(k, dim=-1).indices.tolist()
    num_columns, values = probs.shape[1], []
    for rows in sequences:
        if not rows:
            continue
        length = len(rows)
        values.append(sum(num_columns / (k * length) * sum(i in top[t] for t in rows)
                          * sum(float(probs[t, i]) for t in rows) / length for i in range(num_columns)))
    return sum(values) / len(values)


def test_seq_balance_per_sequence_by_hand():
    r = seq_routing(LOGITS, (2, 2))
    p = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1)
    # sequence 0 = rows 0, 1 (argmax 0, 1): f = (1.5, 1.5, 0); sequence 1 = rows 2, 3 (argmax 0, 2): f = (1.5, 0, 1.5)
    want = (1.5 * (p[0, 0] + p[1, 0]) / 2 + 1.5 * (p[0, 1] + p[1, 1]) / 2
            + 1.5 * (p[2, 0] + p[3, 0]) / 2 + 1.5 * (p[2, 2] + p[3, 2]) / 2) / 2
    assert float(seq_balance_loss(r)) == pytest.approx(float(want))
    assert float(seq_balance_loss(r)) == pytest.approx(seq_balance_by_hand(p, [[0, 1], [2, 3]], 1))


def test_seq_balance_flat_tokens_are_one_sequence_and_differ_from_per_sequence():
    p = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1)
    flat = float(seq_balance_loss(seq_routing(LOGITS, (4,))))
    assert flat == pytest.approx(seq_balance_by_hand(p, [[0, 1, 2, 3]], 1))
    # flat, it is the Switch loss (f of all tokens times mean probs), here 3 * sum(f * pbar)
    assert flat == pytest.approx(float(switch_loss(seq_routing(LOGITS, (4,)))))
    assert flat != pytest.approx(float(seq_balance_loss(seq_routing(LOGITS, (2, 2)))))


def test_seq_balance_k2_sigmoid_scores_are_normalised_per_token():
    torch.manual_seed(3)
    logits = torch.randn(6, 4, dtype=torch.float64)
    r = seq_routing(logits, (3, 2), k=2, sigmoid=True)
    want = seq_balance_by_hand(logits.sigmoid(), [[0, 1], [2, 3], [4, 5]], 2)
    assert float(seq_balance_loss(r)) == pytest.approx(want)


def test_seq_balance_balanced_value_is_one():
    one_hot = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]
    r = seq_routing(one_hot + one_hot[::-1], (2, 3))  # each sequence sends one token to each expert
    assert float(seq_balance_loss(r)) == pytest.approx(1.0)


def test_seq_balance_skips_masked_tokens():
    # input (2, 2) with token 2 masked: rows 0, 1 are sequence 0, row 2 (input token 3) is sequence 1 alone
    logits = [LOGITS[0], LOGITS[1], LOGITS[3]]
    r = seq_routing(logits, (2, 2), kept=torch.tensor([0, 1, 3]))
    p = torch.tensor(logits, dtype=torch.float64).softmax(-1)
    assert float(seq_balance_loss(r)) == pytest.approx(seq_balance_by_hand(p, [[0, 1], [2]], 1))
    # a sequence with every token masked is not counted
    r = seq_routing(logits, (3, 2), kept=torch.tensor([0, 1, 5]))
    assert float(seq_balance_loss(r)) == pytest.approx(seq_balance_by_hand(p, [[0, 1], [], [2]], 1))


def test_seq_balance_on_a_block_with_token_mask_equals_each_sequence_alone():
    torch.manual_seed(0)
    block = LinearMixture(4, 3, 4, k=2, hole=True, aux_criterion="seq_balance").eval()
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    block(x, token_mask=mask)
    masked = float(block.aux_losses["seq_balance"].detach())
    alone = []
    for b in range(3):
        block(x[b][mask[b]].unsqueeze(0))
        alone.append(float(block.aux_losses["seq_balance"].detach()))
    assert masked == pytest.approx(sum(alone) / 3)
    r = block.routing
    assert r.num_tokens == int(mask[2].sum())


def test_seq_balance_needs_token_choice():
    with pytest.raises(ValueError, match="seq_balance.*token choice"):
        RoutingConfig(expert_choice=True, aux_criterion="seq_balance")


# ----------------------------------------------------------------- global_switch (Qiu et al. 2025)
def test_global_switch_without_counts_is_switch_and_with_counts_uses_them():
    r = routing(LOGITS)
    assert float(global_switch_loss(r)) == pytest.approx(float(switch_loss(r)))
    pbar = torch.tensor(LOGITS, dtype=torch.float64).softmax(-1).mean(0)
    counts = torch.tensor([1, 5, 2])
    assert float(global_switch_loss(r, counts)) == pytest.approx(3 * float((counts / 8 * pbar).sum()))
    balanced = routing([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    assert float(global_switch_loss(balanced, torch.tensor([4, 4, 4]))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="counts must be"):
        global_switch_loss(r, torch.ones(4))


def test_global_switch_counts_every_micro_batch_until_reset():
    torch.manual_seed(0)
    block = LinearMixture(4, 3, 4, k=2, hole=True, aux_criterion="global_switch")
    x1, x2 = torch.randn(2, 6, 4), torch.randn(1, 5, 4)
    block(x1)
    c1 = block.routing.count.clone()
    assert float(block.aux_loss) == pytest.approx(float(switch_loss(block.routing)))  # first: its own f
    block(x2)
    r2, c2 = block.routing, block.routing.count
    total = (c1 + c2).double()
    want = 5 * ((total / total.sum()) * r2.probs.mean(0)).sum()     # p̄ of this micro-batch only
    assert float(block.aux_loss) == pytest.approx(float(want))
    # the counts are those of the concatenated global batch (no noise: routing is per token)
    assert torch.equal(block.global_balance.counts, c1 + c2)
    assert torch.equal(block.route_rows(torch.cat([x1.reshape(-1, 4), x2.reshape(-1, 4)])).count, c1 + c2)
    # gradient: f is a constant, p̄ carries it
    block.router.gate.weight.grad = None
    block.aux_loss.backward()
    got = block.router.gate.weight.grad.clone()
    block.router.gate.weight.grad = None
    want = 5 * ((total / total.sum()) * block.router(x2.reshape(-1, 4))[3].mean(0)).sum()
    want.backward()
    torch.testing.assert_close(got, block.router.gate.weight.grad)
    # eval adds nothing; reset starts a new global batch
    block.eval()(x1)
    assert torch.equal(block.global_balance.counts, c1 + c2)
    assert reset_global_balance(block) == 1 and int(block.global_balance.counts.sum()) == 0
    assert "global_balance" not in block.state_dict() and not any("counts" in k for k in block.state_dict())


def test_global_balance_checks():
    with pytest.raises(ValueError, match="num_columns"):
        GlobalBalance(0)
    with pytest.raises(TypeError, match="group"):
        GlobalBalance(3, group="world")
    with pytest.raises(ValueError, match="3 columns"):
        GlobalBalance(3)(routing([[0.0, 1.0]]))
    assert LinearMixture(4, 3, 2, aux_criterion="switch").global_balance is None
