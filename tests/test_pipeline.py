"""The core pipeline piece by piece: one config, routing → record, the expert-execution seam, dispatch."""
import dataclasses

import pytest
import torch
from torch import nn

from conftest import LinearMixture
from moefy import MoE, ModuleMixture, RoutingConfig, moefy
from moefy.dispatch import FusedExperts, LoopedExperts, dispatch
from moefy.routing import SELECTIONS, Routing, route, select
from moefy.routing.router import Router
from moefy.routing.select import expert_choice, from_picks, token_choice


class MLPMixture(LinearMixture):
    def __init__(self, num_experts=4, **options):
        experts = [nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3)) for _ in range(num_experts)]
        super(LinearMixture, self).__init__(experts=experts, input_dim=6, **options)


# ------------------------------------------------------------------------------------------ config
def test_config_and_keywords_build_the_same_block():
    config = RoutingConfig(k=2, hole=True, noise="gumbel", aux_criterion={"switch": 0.5}, layer_id=3)
    torch.manual_seed(1)
    a = LinearMixture(4, 5, 3, config=config)
    torch.manual_seed(1)
    b = LinearMixture(4, 5, 3, k=2, hole=True, noise="gumbel", aux_criterion={"switch": 0.5}, layer_id=3)
    assert a.config == b.config == config
    x = torch.randn(7, 4)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a.routing.counts == b.routing.counts and float(a.aux_loss.detach()) == float(b.aux_loss.detach())
    assert repr(a) == repr(b) and config.summary(3) in repr(a)


def test_keywords_replace_config_fields_and_attributes_are_read_only_views():
    config = RoutingConfig(k=2, hole=True)
    block = LinearMixture(4, 5, 3, config=config, k=1, aggregation="mean")
    assert block.config == dataclasses.replace(config, k=1, aggregation="mean")
    assert config.k == 2  # the caller's config is not changed
    for f in dataclasses.fields(RoutingConfig):
        assert getattr(block, f.name) == getattr(block.config, f.name), f.name
    with pytest.raises(AttributeError):
        block.k = 3
    with pytest.raises(TypeError, match=r"config must be a RoutingConfig or None, got dict"):
        LinearMixture(4, 5, 3, config={"k": 2})
    with pytest.raises(ValueError, match=r"k must be a number in \[1, 4\] \(the number of experts \+ hole\)"):
        LinearMixture(4, 5, 3, config=RoutingConfig(k=5, hole=True))


def test_upcycling_and_seed_layers_take_a_config():
    mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    config = RoutingConfig(k=2, hole=True, aux_criterion="switch")
    moe = moefy(mlp, num_experts=3, config=config)
    assert isinstance(moe, ModuleMixture) and moe.config == config and moe.route == "tokens"
    assert moefy(mlp, num_experts=3, k=1, config=config).config == dataclasses.replace(config, k=1)
    # route and feature_dim are still inferred per module unless the config asks for something else
    conv = moefy(nn.Conv2d(3, 4, 3), num_experts=2, config=config)
    assert (conv.route, conv.feature_dim) == ("samples", 1)
    per_sample = moefy(mlp, num_experts=2, config=RoutingConfig(route="samples"))
    assert per_sample.route == "samples"
    # a model: numbered layers unless the config names one
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    moefy(model, num_experts=2, target=nn.Linear, config=config)
    assert [model[0].layer_id, model[2].layer_id] == [0, 1] and model[2].config.hole
    seed = MoE(6, 3, num_experts=4, hidden_size=8, k=2, config=RoutingConfig(hole=True))
    assert seed.hole and seed.k == 2 and seed.noise == "gaussian" and seed.aux_weights == {"cv2": 0.01}


# ------------------------------------------------------------------------------------------ routing
def test_selection_strategies_against_hand_counts():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    assert set(SELECTIONS) == {"token_choice", "expert_choice", "group_limited_token_choice"}
    picked = token_choice(probs, RoutingConfig(k=1, hole=True), num_experts=2)  # column 2 is the hole
    assert picked.expert_index.tolist() == [0, 0, 2, 2] and picked.token_index.tolist() == [0, 2, 1, 3]
    assert picked.host_counts == (2, 0, 2) and int(picked.dropped) == 2 and picked.weight.tolist() == [1.0] * 4
    assert select(probs, RoutingConfig(k=1, hole=True), 2).expert_index.tolist() == [0, 0, 2, 2]
    top2 = token_choice(probs, RoutingConfig(k=2), num_experts=3)
    assert top2.host_counts == (4, 2, 2) and int(top2.dropped) == 0  # t3 ties 0.1 / 0.1: the first column
    torch.testing.assert_close(top2.weights.sum(1), torch.ones(4))
    # expert choice, C = ceil(1.0 * 4 * 1 / 3) = 2: column 0 takes tokens 0, 2; column 1 tokens 2, 0;
    # the hole column 2 tokens 3, 1 -> tokens 1 and 3 were picked by no real expert
    ec = expert_choice(probs, RoutingConfig(expert_choice=True, hole=True), num_experts=2)
    assert ec.indices.tolist() == [[0, 2], [2, 0], [3, 1]] and int(ec.dropped) == 2
    assert ec.host_counts == (2, 2, 2) and ec.weight.tolist() == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.8, 0.7])


def test_the_record_is_built_in_one_place_and_remaps_masked_tokens():
    torch.manual_seed(0)
    router = Router(4, 3)
    x = torch.randn(5, 4)
    kept = torch.tensor([0, 2, 3, 6, 7])  # the 5 routed rows among 8 input tokens
    r = route(router, x, RoutingConfig(k=2), num_experts=3, tokens_shape=(2, 4), kept=kept)
    plain = route(router, x, RoutingConfig(k=2), num_experts=3)
    assert isinstance(r, Routing) and r.tokens_shape == (2, 4) and plain.tokens_shape == (5,)
    assert r.token_index.tolist() == kept[plain.token_index].tolist()
    assert torch.equal(r.expert_index, plain.expert_index) and r.counts == plain.counts
    # gather_routing's path: picks (T, k) back into a record, through the same builder
    picked = from_picks(plain.indices, plain.weights, 3, 3, hole=False)
    again = Routing.build((plain.logits, plain.noisy_logits, plain.noise_std, plain.probs), picked, 3, False)
    for name in ("token_index", "expert_index", "weight", "count"):
        assert torch.equal(getattr(again, name), getattr(plain, name)), name


def test_assignments_without_a_hole_need_no_counts():
    r = route(Router(4, 3), torch.randn(6, 4), RoutingConfig(k=2), num_experts=3)
    unread = dataclasses.replace(r, host_counts=None)  # as on a GPU, before anything reads the counts
    assert unread.num_assigned == 12 and unread.host_counts is None
    holed = route(Router(4, 3), torch.randn(6, 4), RoutingConfig(k=1, hole=True), num_experts=2)
    assert holed.num_assigned == sum(holed.counts[:2])


# ------------------------------------------------------------------------------------------ execution seam
def hand_mixture(block, x):
    """y_t = Σ_i w_ti f_i(x_t), one token and one assignment at a time, in float64."""
    r = block.routing
    y = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        if e < block.num_experts:
            y[t] += w * block.experts[e](x[t:t + 1].double()).squeeze(0)
    return y


@pytest.mark.parametrize("options", [dict(k=2), dict(k=1, hole=True), dict(expert_choice=True, k=2)])
def test_looped_and_fused_experts_equal_the_hand_mixture(options):
    torch.manual_seed(0)
    block = MLPMixture(fused=True, **options).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = block(x)
    assert isinstance(block._execution(x, side_inputs=False), FusedExperts)
    assert isinstance(block._execution(x, side_inputs=True), LoopedExperts)
    looped = dispatch(x, block.routing, block._looped, block._run_expert, block.aggregation)
    torch.testing.assert_close(y, hand_mixture(block, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(looped, y, rtol=1e-12, atol=1e-12)
    assert isinstance(MLPMixture(**options)._execution(x, side_inputs=False), LoopedExperts)


def test_every_expert_gets_a_gradient_even_when_idle_or_when_all_is_dropped():
    torch.manual_seed(0)
    for fused in (False, True):
        block = MLPMixture(num_experts=6, fused=fused, k=1)
        block(torch.randn(2, 6)).sum().backward()  # 2 tokens reach at most 2 of the 6 experts
        assert all(p.grad is not None for p in block.parameters())
        idle = [e for e, n in enumerate(block.routing.counts[:6]) if n == 0]
        assert len(idle) >= 4 and all(float(p.grad.abs().sum()) == 0 for e in idle
                                      for p in block.experts[e].parameters())
    hole_only = MLPMixture(num_experts=2, k=1, hole=True)
    with torch.no_grad():
        hole_only.router.gate.weight.zero_()
        hole_only.router.gate.weight[2] = 10.0  # every token prefers the hole
    y = hole_only(torch.ones(3, 6))
    assert torch.equal(y, torch.zeros(3, 3)) and int(hole_only.routing.dropped) == 3
    y.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in hole_only.experts.parameters())
