"""Shared experts and DeepSeek-V3's routing (selection bias, group-limited top-k, routed scaling factor).

References: HF transformers' ``DeepseekV3MoE`` (``DeepseekV3TopkRouter``) and ``Qwen2MoeSparseMoeBlock``, built
from small configs with random weights; hand computations; gradcheck in float64.
"""
import pytest
import torch
from torch import nn

import moefy
from conftest import LinearMixture, SwiGLU, SwiGLUMixture
from moefy import RoutingConfig
from moefy.routing.select import SELECTIONS, group_limited_token_choice, select, strategy_name


# ------------------------------------------------------------------ HF references
def _copy_experts(block, gate_up, down):
    """HF's stacked experts (E, 2H, D) / (E, D, H) into SwiGLU experts (gate = first half, as HF's chunk)."""
    hidden = down.shape[-1]
    with torch.no_grad():
        for e, expert in enumerate(block.experts):
            expert.gate_proj.weight.copy_(gate_up[e, :hidden])
            expert.up_proj.weight.copy_(gate_up[e, hidden:])
            expert.down_proj.weight.copy_(down[e])


def _copy_mlp_split(shared_experts, mlp):
    """One HF MLP of hidden S·H as S SwiGLU experts of hidden H: SwiGLU is a sum over its hidden units."""
    with torch.no_grad():
        h = shared_experts[0].gate_proj.out_features
        for j, s in enumerate(shared_experts):
            s.gate_proj.weight.copy_(mlp.gate_proj.weight[j * h:(j + 1) * h])
            s.up_proj.weight.copy_(mlp.up_proj.weight[j * h:(j + 1) * h])
            s.down_proj.weight.copy_(mlp.down_proj.weight[:, j * h:(j + 1) * h])


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_deepseek_v3_moe_reference():
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3",
                             reason="needs the transformers package (DeepseekV3MoE reference)")
    from transformers import DeepseekV3Config
    cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
                           num_experts_per_tok=2, n_shared_experts=2, norm_topk_prob=True,
                           routed_scaling_factor=2.5, hidden_act="silu")
    ref = ds.DeepseekV3MoE(cfg).float().eval()
    _randomise(ref)
    with torch.no_grad():
        ref.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    block = SwiGLUMixture(32, 16, 8, shared_hidden=(16, 16), k=2, score_func="sigmoid", selection_bias=True,
                          n_group=4, topk_group=2, normalize=True, routed_scaling_factor=2.5).eval()
    _copy_experts(block, ref.experts.gate_up_proj, ref.experts.down_proj)
    _copy_mlp_split(block.shared_experts, ref.shared_experts)
    with torch.no_grad():
        block.router.gate.weight.copy_(ref.gate.weight)
        block.router.score_correction_bias.copy_(ref.gate.e_score_correction_bias)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected, got = ref(x), block(x)
    assert (got - expected).abs().max() < 1e-5
    # the same experts as HF's router picked, and the bias did change some choices
    _, _, hf_idx = ref.gate(x)
    assert torch.equal(block.routing.indices.sort(-1).values, hf_idx.sort(-1).values)
    with torch.no_grad():
        block.router.score_correction_bias.zero_()
        block(x)
    assert not torch.equal(block.routing.indices.sort(-1).values, hf_idx.sort(-1).values)


def test_qwen2_moe_sparse_block_reference():
    qw = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe",
                             reason="needs the transformers package (Qwen2MoeSparseMoeBlock reference)")
    from transformers import Qwen2MoeConfig
    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu")
    ref = qw.Qwen2MoeSparseMoeBlock(cfg).float().eval()
    _randomise(ref)
    block = SwiGLUMixture(32, 16, 6, shared_hidden=(24,), k=2, normalize=False, shared_gate=True).eval()
    _copy_experts(block, ref.experts.gate_up_proj, ref.experts.down_proj)
    _copy_mlp_split(block.shared_experts, ref.shared_expert)
    with torch.no_grad():
        block.router.gate.weight.copy_(ref.gate.weight)
        block.shared_expert_gate.weight.copy_(ref.shared_expert_gate.weight)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (block(x) - ref(x)).abs().max() < 1e-5


# ------------------------------------------------------------------ group-limited selection by hand
# T = 3 tokens, E = 6 experts in 3 groups of 2, keep 2 groups, k = 2. Group scores (sum of each group's top 2):
#   token 0: g0 = .9+.1 = 1.0, g1 = .5+.4 = .9, g2 = .8+.05 = .85 → keep g0, g1 → experts 0 (.9), 2 (.5);
#            plain top-2 would take expert 4 (.8) from the dropped group g2.
#   token 1: g0 = .5, g1 = 1.15, g2 = .8 → keep g1, g2 → experts 4 (.7), 2 (.6).
#   token 2: g0 = .65, g1 = .3, g2 = .95 → keep g2, g0 → experts 4 (.95), 0 (.35).
PROBS = torch.tensor([[0.9, 0.1, 0.5, 0.4, 0.8, 0.05],
                      [0.2, 0.3, 0.6, 0.55, 0.7, 0.1],
                      [0.35, 0.3, 0.1, 0.2, 0.95, 0.0]])
GROUPS = dict(k=2, n_group=3, topk_group=2, score_func="sigmoid")


def test_group_limited_selection_by_hand():
    config = RoutingConfig(**GROUPS)
    assert strategy_name(config) == "group_limited_token_choice" and SELECTIONS[strategy_name(config)] is \
        group_limited_token_choice
    picked = select(PROBS, config, 6)
    assert picked.indices.tolist() == [[0, 2], [4, 2], [4, 0]]
    expected = torch.tensor([[0.9 / 1.4, 0.5 / 1.4], [0.7 / 1.3, 0.6 / 1.3], [0.95 / 1.3, 0.35 / 1.3]])
    torch.testing.assert_close(picked.weights, expected)
    assert picked.count.tolist() == [2, 0, 2, 0, 2, 0] and int(picked.dropped) == 0
    assert picked.expert_index.tolist() == [0, 0, 2, 2, 4, 4] and picked.token_index.tolist() == [0, 2, 0, 1, 1, 2]
    # unnormalised and scaled: the raw scores times routed_scaling_factor
    raw = select(PROBS, RoutingConfig(**GROUPS, normalize=False, routed_scaling_factor=2.5), 6)
    torch.testing.assert_close(raw.weights, 2.5 * PROBS.gather(1, raw.indices))
    # all groups kept: plain top-k
    plain = select(PROBS, RoutingConfig(k=2, n_group=3, topk_group=None), 6)
    assert plain.indices.tolist() == select(PROBS, RoutingConfig(k=2), 6).indices.tolist()


def test_bias_changes_the_choice_not_the_weights():
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    # token 0 with +1 on expert 5: g2 = .8 + 1.05 = 1.85 beats g1 = .9 → experts 5 (1.05), 0 (.9);
    # weights are the unbiased scores .05 and .9, renormalised
    picked = select(PROBS, RoutingConfig(**GROUPS, selection_bias=True), 6, bias=bias)
    assert picked.indices[0].tolist() == [5, 0]
    torch.testing.assert_close(picked.weights[0], torch.tensor([0.05 / 0.95, 0.9 / 0.95]))
    # without groups too: the biased top-2 of token 0 is 5 and 0, weighted by the raw .05 and .9
    flat = select(PROBS, RoutingConfig(k=2, normalize=False, selection_bias=True), 6, bias=bias)
    assert flat.indices[0].tolist() == [5, 0]
    torch.testing.assert_close(flat.weights[0], torch.tensor([0.05, 0.9]))
    # the block: the record and the weights see the bias only through the choice
    block = LinearMixture(4, 3, 6, k=2, normalize=False, selection_bias=True)
    with torch.no_grad():
        block.router.score_correction_bias.copy_(bias * 10)
    block(torch.randn(8, 4))
    assert (block.routing.indices[:, 0] == 5).all()
    torch.testing.assert_close(block.routing.weights, block.routing.probs.gather(1, block.routing.indices))


def test_block_bias_is_a_saved_buffer_and_the_record_keeps_unbiased_scores():
    block = LinearMixture(4, 3, 6, **GROUPS, selection_bias=True).eval()
    assert torch.equal(block.state_dict()["router.score_correction_bias"], torch.zeros(6))
    x = torch.randn(20, 4)
    y0 = block(x)
    with torch.no_grad():
        block.router.score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0]))
    y1 = block(x)
    r = block.routing
    assert (r.indices.sort(-1).values == torch.tensor([0, 1])).all()  # the bias decides: group 0 for every token
    torch.testing.assert_close(r.probs, torch.sigmoid(x @ block.router.gate.weight.t()))  # unbiased
    torch.testing.assert_close(r.weights, r.probs.gather(1, r.indices) / r.probs.gather(1, r.indices).sum(-1, True))
    assert not torch.allclose(y0, y1)
    copy = LinearMixture(4, 3, 6, **GROUPS, selection_bias=True)
    copy.load_state_dict(block.state_dict())
    assert torch.equal(copy.router.score_correction_bias, block.router.score_correction_bias)


@pytest.mark.parametrize("options", [dict(GROUPS, selection_bias=True), dict(k=3, n_group=2, topk_group=1),
                                     dict(k=2, n_group=3, noise="gumbel", score_func="sigmoid")])
def test_every_slot_is_processed_and_eval_is_deterministic(options):
    block = LinearMixture(4, 3, 6, **options)
    with torch.no_grad():
        if block.router.score_correction_bias is not None:
            block.router.score_correction_bias.normal_()
    x = torch.randn(2, 9, 4)
    block.train()(x)
    assert int(block.routing.load.sum() + block.routing.dropped) == 18 * block.k
    block.eval()
    assert torch.equal(block(x), block(x))
    # the chosen experts lie in topk_group groups per token
    groups = block.routing.indices // (6 // block.n_group)
    assert all(len(set(g.tolist())) <= (block.topk_group or block.n_group) for g in groups)


def test_gradcheck_sigmoid_groups_shared_gate():
    torch.manual_seed(3)
    block = SwiGLUMixture(4, 3, 6, shared_hidden=(3,), k=2, n_group=3, topk_group=2, score_func="sigmoid",
                          selection_bias=True, routed_scaling_factor=1.5, shared_gate=True).double().eval()
    with torch.no_grad():
        block.router.score_correction_bias.normal_(0, 0.1)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = block.router.gate.weight.detach().clone().requires_grad_(True)
    g = block.shared_expert_gate.weight.detach().clone().requires_grad_(True)

    def f(x, w, g):
        return torch.func.functional_call(block, {"router.gate.weight": w, "shared_expert_gate.weight": g}, (x,))
    assert torch.autograd.gradcheck(f, (x, w, g))


# ------------------------------------------------------------------ shared experts
def test_shared_experts_add_to_the_routed_mixture_and_skip_masked_rows():
    block = LinearMixture(4, 3, 4, k=2, shared_experts=[nn.Linear(4, 3), nn.Linear(4, 3)], shared_gate=True)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    y = block(x, token_mask=mask)
    r = block.routing
    routed = torch.zeros(10, 3)
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        routed[t] += w * block.experts[e](x.reshape(10, 4)[t])
    rows = x.reshape(10, 4)
    gate = torch.sigmoid(rows @ block.shared_expert_gate.weight.t())                         # (10, 1)
    shared = gate * (block.shared_experts[0](rows) + block.shared_experts[1](rows))
    expected = (routed + shared) * mask.reshape(10, 1)
    torch.testing.assert_close(y.reshape(10, 3), expected)
    assert int(r.load.sum()) == 2 * int(mask.sum())  # shared experts count in no load


def test_shared_experts_see_only_routed_rows_and_samples():
    calls = []

    class Counting(LinearMixture):
        def expert_forward(self, expert, x):
            calls.append((type(expert).__name__, getattr(expert, "expert_id", "shared"), x.shape[0]))
            return expert(x)
    block = Counting(4, 3, 3, k=1, shared_experts=[nn.Linear(4, 3)])
    block(torch.randn(6, 4), token_mask=torch.tensor([True, False, True, True, False, True]))
    assert [c[2] for c in calls if c[1] == "shared"] == [4]
    # per sample: the shared conv runs on whole samples, like the routed ones
    conv = nn.Conv2d(3, 4, 3, padding=1)
    mix = moefy.moefy(conv, 3, k=2, num_shared=1)
    assert mix.route == "samples" and len(mix.shared_experts) == 1
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(mix(x), 2 * conv(x), rtol=1e-5, atol=1e-5)


def test_moefy_with_shared_copies_is_not_exact_and_the_halving_recipe_makes_it_exact():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(7, 4)
    mix = moefy.moefy(mlp, 4, k=2, num_shared=2)
    torch.testing.assert_close(mix(x), 3 * mlp(x))            # (routed_scaling_factor + S) · f(x), S = 2
    assert not hasattr(mix.shared_experts[0], "expert_id")
    # the README's recipe: the output is linear in the last Linear, so scale it in every copy by 1 / (1 + S)
    with torch.no_grad():
        for copy in [*mix.experts, *mix.shared_experts]:
            copy[-1].weight.div_(3)
            copy[-1].bias.div_(3)
    torch.testing.assert_close(mix(x), mlp(x))
    # or routed_scaling_factor with S = 1 and a zero shared gate, sigmoid(0) = 1/2: 1/2 f + 1/2 f
    gated = moefy.moefy(mlp, 4, k=2, num_shared=1, shared_gate=True, routed_scaling_factor=0.5)
    with torch.no_grad():
        gated.shared_expert_gate.weight.zero_()
    torch.testing.assert_close(gated(x), mlp(x))


def test_dense_checkpoint_loads_into_the_shared_copies_too():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    dense = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).state_dict()
    moefy.moefy(model, 3, k=2, target="0", num_shared=1, shared_gate=True)
    moefy.load_dense_state_dict(model, dense)
    for copy in [*model[0].experts, *model[0].shared_experts]:
        assert torch.equal(copy.weight, dense["0.weight"]) and torch.equal(copy.bias, dense["0.bias"])


def test_shared_experts_get_the_side_inputs_sliced_like_the_routed_ones():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    mix = moefy.moefy(mha, 3, k=2, num_shared=1).eval()
    q, kv = torch.randn(4, 5, 8), torch.randn(4, 6, 8)
    mask = torch.rand(4 * 2, 5, 6) > 0.8                       # per sample: sliced with the samples
    out, weights = mix(q, kv, kv, attn_mask=mask)
    ref_out, ref_weights = mha(q, kv, kv, attn_mask=mask)
    torch.testing.assert_close(out, 2 * ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, 2 * ref_weights, rtol=1e-5, atol=1e-5)


def test_fused_routed_experts_with_shared_experts_match_unfused():
    torch.manual_seed(5)
    shared = [nn.Linear(4, 3)]
    unfused = LinearMixture(4, 3, 6, k=2, n_group=3, topk_group=2, shared_experts=shared, shared_gate=True)
    fused = LinearMixture(4, 3, 6, k=2, n_group=3, topk_group=2, shared_experts=shared, shared_gate=True,
                          fused=True)
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(fused(x), unfused(x))
