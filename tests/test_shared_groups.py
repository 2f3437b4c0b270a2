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
