"""MoEBlock routing semantics against hand computations."""
import math

import pytest
import torch
from torch import nn

from moefy import MoEBlock, aux_loss, moe_blocks
from conftest import LinearMixture, RecordingMixture


def scores(block, x2d):
    return torch.softmax(x2d @ block.router.gate.weight.t(), dim=-1)


def test_seed_example_keywords_and_repr():
    m = LinearMixture(k=1, num_experts=3, input_dim=4, output_dim=5, expert_choice=False, hole=True,
                      noise="gumbel", aux_criterion="entropy", aggregation="sum", layer_id=0)
    y = m(torch.randn(2, 6, 4))
    assert y.shape == (2, 6, 5)
    text = repr(m)
    for part in ["layer_id=0", "experts=3", "hole=True", "token_choice(k=1", "noise=gumbel", "entropy",
                 "aggregation=sum"]:
        assert part in text
    assert [e.expert_id for e in m.experts] == [0, 1, 2]
    assert m.num_columns == 4 and m.aux_loss.dim() == 0


@pytest.mark.parametrize("k,normalize", [(1, True), (2, True), (3, True), (2, False), (4, False)])
def test_token_choice_matches_hand_computation(k, normalize):
    m = LinearMixture(4, 3, num_experts=4, k=k, normalize=normalize).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = m(x)
    flat = x.reshape(-1, 4)
    p = scores(m, flat)
    want = torch.zeros(10, 3, dtype=torch.float64)
    for t in range(10):
        top = sorted(range(4), key=lambda e: -p[t, e])[:k]
        total = sum(p[t, e] for e in top)
        for e in top:
            w = p[t, e] / total if normalize else p[t, e]
            want[t] += w * m.experts[e](flat[t])
    torch.testing.assert_close(y.reshape(-1, 3), want)
    assert sum(m.routing.counts) == 10 * k
    assert int(m.routing.dropped) == 0
    assert m.routing.indices.shape == (10, k)


def test_each_expert_sees_only_its_tokens():
    m = RecordingMixture(4, 3, num_experts=5, k=2)
    m(torch.randn(3, 7, 4))
    assert sum(n for _, n in m.calls) == 3 * 7 * 2
    assert all(n > 0 for _, n in m.calls)
    assert dict(m.calls) == {e: n for e, n in enumerate(m.routing.counts) if n}


def test_hole_drops_and_counts():
    m = LinearMixture(4, 3, num_experts=2, k=1, hole=True).double()
    with torch.no_grad():  # column 2 (the hole) wins where 5 x0 > |x1|
        m.router.gate.weight.copy_(torch.tensor([[0, 1, 0, 0], [0, -1, 0, 0], [5, 0, 0, 0]]).double())
    x = torch.randn(40, 4, dtype=torch.float64)
    y = m(x)
    to_hole = 5 * x[:, 0] > x[:, 1].abs()
    assert int(m.routing.dropped) == int(to_hole.sum()) > 0
    assert torch.all(y[to_hole] == 0)
    assert torch.all(y[~to_hole].abs().sum(-1) > 0)
    assert sum(m.routing.counts[:2]) + int(m.routing.dropped) == 40
    assert m.experts_load().shape == (3, 1)


def test_hole_with_k2_keeps_real_slot_weight():
    m = LinearMixture(4, 3, num_experts=3, k=2, hole=True).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = m(x)
    p = scores(m, x)
    want = torch.zeros(30, 3, dtype=torch.float64)
    for t in range(30):
        top = p[t].topk(2).indices.tolist()
        for e in top:
            if e < 3:
                want[t] += p[t, e] / p[t, top].sum() * m.experts[e](x[t])
    torch.testing.assert_close(y, want)
    assert m.routing.num_assigned + int(m.routing.dropped) == 60


@pytest.mark.parametrize("capacity_factor,capacity", [(1.0, None), (0.5, None), (2.0, None), (1.0, 3)])
def test_expert_choice_matches_hand_computation(capacity_factor, capacity):
    m = LinearMixture(4, 3, num_experts=3, k=1, expert_choice=True, capacity_factor=capacity_factor,
                      capacity=capacity).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = m(x)
    p = scores(m, x)
    c = capacity or min(12, math.ceil(capacity_factor * 12 / 3))
    want = torch.zeros(12, 3, dtype=torch.float64)
    picked = set()
    for e in range(3):
        for t in p[:, e].topk(c).indices.tolist():
            want[t] += p[t, e] * m.experts[e](x[t])
            picked.add(t)
    torch.testing.assert_close(y, want)
    assert m.routing.counts == (c, c, c)
    assert int(m.routing.dropped) == 12 - len(picked)
    assert torch.all(y[[t for t in range(12) if t not in picked]] == 0)


def test_expert_choice_with_hole_counts_tokens_no_real_expert_took():
    m = LinearMixture(4, 3, num_experts=2, k=1, expert_choice=True, hole=True).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = m(x)
    p = scores(m, x)
    picked = {t for e in range(2) for t in p[:, e].topk(3).indices.tolist()}
    assert int(m.routing.dropped) == 9 - len(picked)
    assert torch.all(y[[t for t in range(9) if t not in picked]] == 0)


def test_mean_aggregation_divides_by_experts_that_processed_the_token():
    kw = dict(num_experts=4, k=2)
    torch.manual_seed(1)
    s = LinearMixture(4, 3, **kw).double()
    mean = LinearMixture(4, 3, aggregation="mean", **kw).double()
    mean.load_state_dict(s.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(mean(x), s(x) / 2)


def test_per_sample_routing_uses_mean_feature_and_runs_whole_samples():
    class SeqMixture(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Linear(4, 4) for _ in range(3)], input_dim=4, k=1, route="samples")
            self.shapes = []

        def expert_forward(self, expert, x):
            self.shapes.append(tuple(x.shape[1:]))
            return expert(x).cumsum(dim=1)  # depends on the whole sequence

    m = SeqMixture().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = m(x)
    p = scores(m, x.mean(dim=1))
    for b in range(6):
        e = int(p[b].argmax())
        torch.testing.assert_close(y[b], m.experts[e](x[b]).cumsum(dim=0))
    assert set(m.shapes) == {(5, 4)}
    assert sum(m.routing.counts) == 6


def test_samples_route_with_channels_first():
    class ConvMixture(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Conv2d(3, 2, 3) for _ in range(2)], input_dim=3, k=1,
                             route="samples", feature_dim=1)

        def expert_forward(self, expert, x):
            return expert(x)

    m = ConvMixture()
    y = m(torch.randn(4, 3, 8, 6))
    assert y.shape == (4, 2, 6, 4)
    with pytest.raises(ValueError, match="input_dim=3"):
        m(torch.randn(4, 5, 8, 6))


def test_eval_is_deterministic_and_training_noise_is_not():
    for noise in ["gumbel", "gaussian", "jitter"]:
        m = LinearMixture(8, 3, num_experts=6, k=2, noise=noise)
        x = torch.randn(64, 8)
        m.eval()
        y1, r1 = m(x), m.routing.indices
        y2 = m(x)
        assert torch.equal(y1, y2) and torch.equal(r1, m.routing.indices)
        m.train()
        m(x)
        i1 = m.routing.probs
        m(x)
        assert not torch.equal(i1, m.routing.probs), noise


def test_empty_batch_and_single_token():
    m = LinearMixture(4, 5, num_experts=3, k=2, aux_criterion=["switch", "entropy", "z", "balance", "cv2"])
    y = m(torch.randn(0, 4))
    assert y.shape == (0, 5)
    assert torch.isfinite(m.aux_loss)
    y = m(torch.randn(2, 0, 4))
    assert y.shape == (2, 0, 5)
    y = m(torch.randn(4))
    assert y.shape == (5,)
    assert sum(m.routing.counts) == 2
    y.sum().backward()
    ec = LinearMixture(4, 5, num_experts=3, expert_choice=True)
    assert ec(torch.randn(0, 4)).shape == (0, 5)
    assert ec(torch.randn(1, 4)).shape == (1, 5)


def test_experts_load_counts_positions():
    m = LinearMixture(4, 4, num_experts=3, k=2)
    m(torch.randn(5, 7, 4))
    load = m.experts_load()
    assert load.shape == (3, 7)
    assert torch.all(load.sum(0) == 5 * 2)
    assert torch.equal(load.sum(1), m.abs_experts_load())
    idx = m.routing.indices.reshape(5, 7, 2)
    for e in range(3):
        for n in range(7):
            assert load[e, n] == (idx[:, n] == e).sum()


def test_state_dict_roundtrip_weights_only(tmp_path):
    m = LinearMixture(4, 5, num_experts=3, k=2, noise="gaussian", aux_criterion="prob")
    torch.save(m.state_dict(), tmp_path / "ckpt.pt")
    fresh = LinearMixture(4, 5, num_experts=3, k=2, noise="gaussian", aux_criterion="prob")
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    m.eval(), fresh.eval()
    x = torch.randn(10, 4)
    torch.testing.assert_close(m(x), fresh(x), rtol=0, atol=0)


def test_model_level_aux_loss_sums_blocks():
    a = LinearMixture(4, 4, num_experts=3, aux_criterion="switch", layer_id=0)
    b = LinearMixture(4, 4, num_experts=3, aux_criterion={"z": 0.5, "entropy": 2.0}, layer_id=1)
    model = nn.Sequential(a, nn.ReLU(), b)
    assert float(aux_loss(model)) == 0.0  # nothing ran yet
    model(torch.randn(6, 4))
    assert moe_blocks(model) == [a, b]
    torch.testing.assert_close(aux_loss(model), a.aux_loss + b.aux_loss)
    torch.testing.assert_close(b.aux_loss, 0.5 * b.aux_losses["z"] + 2.0 * b.aux_losses["entropy"])


def test_expert_output_must_be_one_tensor():
    class Bad(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Linear(4, 4)], input_dim=4)

        def expert_forward(self, expert, x):
            return expert(x), None

    with pytest.raises(TypeError, match="returned tuple"):
        Bad()(torch.randn(3, 4))


def test_side_inputs_are_sliced_per_sample():
    class Masked(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Linear(4, 4) for _ in range(3)], input_dim=4, route="samples")

        def expert_forward(self, expert, x, mask, scale=1.0):
            return expert(x) * mask.unsqueeze(-1) * scale

    m = Masked()
    x, mask = torch.randn(5, 6, 4), (torch.rand(5, 6) > 0.5).float()
    y = m(x, mask, scale=2.0)
    for b in range(5):
        e = int(m.routing.indices[b, 0])
        torch.testing.assert_close(y[b], m.experts[e](x[b]) * mask[b].unsqueeze(-1) * 2.0)


def test_checkpoint_that_does_not_fit_names_the_mismatch(tmp_path):
    small, big = LinearMixture(4, 5, num_experts=3), LinearMixture(4, 5, num_experts=4)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    sd = torch.load(tmp_path / "small.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"checkpoint has 3 router columns, this block has 4 \(4 experts\)"):
        big.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"checkpoint has 3 router columns, this block has 4 \(3 experts \+ hole\)"):
        LinearMixture(4, 5, num_experts=3, hole=True).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"checkpoint has input_dim=6, this block has input_dim=4"):
        small.load_state_dict(LinearMixture(6, 5, num_experts=3).state_dict())
    model = nn.Sequential(nn.Linear(4, 4), big)
    with pytest.raises(ValueError, match=r"at '1\.'"):
        model.load_state_dict({"0.weight": torch.zeros(4, 4), "0.bias": torch.zeros(4),
                               **{"1." + k: v for k, v in sd.items()}})


def test_side_inputs_are_sliced_per_token():
    class Scaled(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Linear(4, 3) for _ in range(3)], input_dim=4, k=2)

        def expert_forward(self, expert, x, scale, bias):
            return expert(x) * scale + bias

    m = Scaled().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    scale, bias = torch.rand(2, 5, 1, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = m(x, scale, bias=bias)
    p = torch.softmax(x.reshape(-1, 4) @ m.router.gate.weight.t(), -1)
    want = torch.zeros(10, 3, dtype=torch.float64)
    for t in range(10):
        top = p[t].topk(2).indices.tolist()
        for e in top:
            want[t] += p[t, e] / p[t, top].sum() * (m.experts[e](x.reshape(-1, 4)[t]) * scale.reshape(-1, 1)[t] + bias)
    torch.testing.assert_close(y.reshape(-1, 3), want)
