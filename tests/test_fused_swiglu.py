"""fused=True with SwiGLU experts (gate_proj / up_proj / down_proj / act_fn: HF's LlamaMLP, moefy.hf.SwiGLU): the same
outputs and gradients as one module call per expert, zero (not None) gradients for idle experts, and experts whose
forward is not the SwiGLU formula refused."""
import pytest
import torch
from torch import nn

import moefy
from conftest import SwiGLU
from moefy.dispatch.fused import SWIGLU, fused_layout


class Mixture(moefy.MoEBlock):
    def __init__(self, experts, **options):
        super().__init__(experts=experts, input_dim=experts[0].gate_proj.in_features, **options)

    def expert_forward(self, expert, x):
        return expert(x)


def pair(num_experts=6, k=2, make=lambda: SwiGLU(8, 12), **options):
    torch.manual_seed(0)
    looped = Mixture([make() for _ in range(num_experts)], k=k, **options).double()
    fused = Mixture([make() for _ in range(num_experts)], k=k, fused=True, **options).double()
    fused.load_state_dict(looped.state_dict())
    return looped, fused


def grads(block, x):
    y = block(x)
    params = [p for p in block.parameters()]
    return y, torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                  [x, *params], allow_unused=True)


@pytest.mark.parametrize("num_experts,k", [(6, 2), (16, 1), (4, 4)])
def test_fused_swiglu_equals_the_loop_forward_and_backward(num_experts, k):
    looped, fused = pair(num_experts, k)
    assert fused._fused_layout == (SWIGLU,)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y1, g1 = grads(looped, x)
    y2, g2 = grads(fused, x)
    assert (y1 - y2).abs().max() < 1e-12
    for a, b in zip(g1, g2):
        assert a is not None and b is not None and (a - b).abs().max() < 1e-12
    # idle experts (16 experts, 21 tokens, k=1 leaves some without tokens) get zeros, not None
    idle = [e for e, n in enumerate(fused.routing.counts[:num_experts]) if n == 0]
    for e in idle:
        assert all(float(p.abs().sum()) == 0 for p in torch.autograd.grad(
            fused(x).sum(), list(fused.experts[e].parameters())))


def test_llama_mlp_copies_fuse_and_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 32, (2, 9))
    looped = moefy.moefy(dense, 4, k=2, target="mlp", expert_noise=0.1)
    fused = moefy.moefy(transformers.LlamaForCausalLM(cfg).double(), 4, k=2, target="mlp", fused=True)
    fused.load_state_dict(looped.state_dict())
    assert fused.model.layers[0].mlp._fused_layout == (SWIGLU,)  # transformers' SiLUActivation counts as elementwise
    with torch.no_grad():
        assert (looped(ids).logits - fused(ids).logits).abs().max() < 1e-10


class ScaledSwiGLU(SwiGLU):
    def forward(self, x):
        return 2 * super().forward(x)


class SwiGLUWithDropout(SwiGLU):
    def __init__(self, dim, hidden):
        super().__init__(dim, hidden)
        self.act_fn = nn.Dropout(0.1)


def test_experts_that_are_not_the_formula_do_not_fuse():
    assert fused_layout([ScaledSwiGLU(8, 12) for _ in range(3)]) is None
    assert fused_layout([SwiGLUWithDropout(8, 12) for _ in range(3)]) is None  # not an activation
    assert fused_layout([SwiGLU(8, 12), SwiGLU(8, 16)]) is None  # other shapes
    with pytest.raises(ValueError, match="fused=True needs identical experts.*SwiGLU MLP"):
        Mixture([ScaledSwiGLU(8, 12) for _ in range(3)], fused=True)


def test_from_hf_runs_fused_by_default_and_loops_on_request():
    transformers = pytest.importorskip("transformers")
    from moefy.hf import from_hf
    cfg = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        default, looped = from_hf(model), from_hf(transformers.Qwen3MoeForCausalLM(cfg).eval(), fused=False)
        assert all(b.config.fused and b._fused_layout == (SWIGLU,) for b in moefy.moe_blocks(default))
        assert not any(b.config.fused for b in moefy.moe_blocks(looped))
        torch.testing.assert_close(default(ids).logits, expected, rtol=0, atol=1e-5)
        explicit = from_hf(transformers.Qwen3MoeForCausalLM(cfg).eval(), fused=True)
        assert all(b._fused_layout == (SWIGLU,) for b in moefy.moe_blocks(explicit))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
def test_grouped_backend_runs_gate_up_and_down_as_three_grouped_mms(monkeypatch):
    """The grouped-mm branch (what CUDA bf16 takes) on CPU float32: three grouped mms, the loop's outputs."""
    from moefy.dispatch.fused import fused_experts_forward
    torch.manual_seed(0)
    experts = [SwiGLU(8, 12) for _ in range(4)]
    counts = [3, 0, 5, 2]
    expert_index = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    x = torch.randn(10, 8)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grouped = fused_experts_forward(experts, (SWIGLU,), x, None, expert_index, backend="grouped")
    assert len(calls) == 3
    looped = fused_experts_forward(experts, (SWIGLU,), x, counts, expert_index, backend="loop")
    want = torch.cat([experts[e](x_e) for e, x_e in enumerate(x.split(counts))])
    assert (grouped - want).abs().max() < 1e-5 and (looped - want).abs().max() < 1e-5


def test_the_probe_keeps_mixed_train_eval_flags():
    """fused_layout runs the first expert once in eval mode: every submodule's own flag comes back (a mixture's
    experts may keep mixed flags; module.train(mode) would overwrite them)."""
    experts = [SwiGLU(8, 12) for _ in range(3)]
    experts[0].up_proj.eval()
    assert fused_layout(experts) == (SWIGLU,)
    assert experts[0].training and experts[0].gate_proj.training and not experts[0].up_proj.training


def test_sequential_experts_with_a_transformers_activation_fuse_and_match():
    transformers = pytest.importorskip("transformers")
    act = transformers.activations.ACT2FN["gelu_new"]
    make = lambda: nn.Sequential(nn.Linear(8, 12), act, nn.Linear(12, 8))  # noqa: E731
    torch.manual_seed(0)
    looped = moefy.convert.ModuleMixture(make(), 4, k=2).double()
    fused = moefy.convert.ModuleMixture(make(), 4, k=2, fused=True).double()
    fused.load_state_dict(looped.state_dict())
    assert fused._fused_layout == (("linear", 0), ("act", 1), ("linear", 2))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert (looped(x) - fused(x)).abs().max() < 1e-12
