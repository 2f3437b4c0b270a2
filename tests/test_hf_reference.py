"""Reference equality with HF transformers' plain top-k MoE blocks: ``Qwen3MoeSparseMoeBlock`` (softmax top-k,
``norm_topk_prob=True``) and ``OlmoeSparseMoeBlock`` (``norm_topk_prob=False``), built from small configs with
random weights; their stacked experts are copied into SwiGLU experts (tests/conftest.py).
"""
import pytest
import torch

from conftest import SwiGLUMixture
from test_shared_groups import _copy_experts, _randomise


def _check_against(ref, experts, hidden, dim, k, normalize):
    ref = ref.float().eval()
    _randomise(ref)
    block = SwiGLUMixture(dim, hidden, experts, k=k, normalize=normalize).eval()
    _copy_experts(block, ref.experts.gate_up_proj, ref.experts.down_proj)
    with torch.no_grad():
        block.router.gate.weight.copy_(ref.gate.weight)
    x = torch.randn(3, 7, dim)
    with torch.no_grad():
        expected, got = ref(x), block(x)
        _, hf_weights, hf_idx = ref.gate(x)
    assert got.shape == expected.shape == (3, 7, dim)
    assert (got - expected).abs().max() < 1e-5
    # the same picks, with the same weights, in the same (descending) order as HF's top-k
    assert torch.equal(block.routing.indices, hf_idx)
    torch.testing.assert_close(block.routing.weights, hf_weights.float(), atol=1e-6, rtol=0)


def test_qwen3_moe_sparse_block_reference():
    qw = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe",
                             reason="needs the transformers package (Qwen3MoeSparseMoeBlock reference)")
    from transformers import Qwen3MoeConfig
    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, hidden_act="silu")
    _check_against(qw.Qwen3MoeSparseMoeBlock(cfg), 8, 16, 32, 2, normalize=True)


def test_olmoe_sparse_block_reference():
    ol = pytest.importorskip("transformers.models.olmoe.modeling_olmoe",
                             reason="needs the transformers package (OlmoeSparseMoeBlock reference)")
    from transformers import OlmoeConfig
    cfg = OlmoeConfig(hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=False, hidden_act="silu")
    _check_against(ol.OlmoeSparseMoeBlock(cfg), 8, 16, 32, 3, normalize=False)
