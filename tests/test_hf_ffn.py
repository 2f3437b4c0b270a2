"""HF FFNs route per token: moefy() on tiny random HF models (Llama, Mistral, Qwen2, Qwen3, Gemma, GPT-2, BERT)
keeps the logits exact, and every FFN mixture routes tokens; the probe on plain modules; the log lines."""
import logging

import pytest
import torch
from torch import nn

from conftest import SwiGLU
from moefy import moefy
from moefy.convert import ModuleMixture, infer_routing
from moefy.convert.routes import explain_routing, probe_position_wise

transformers = pytest.importorskip("transformers")

DECODER = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
BERT = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32)
FAMILIES = {  # name: (config, target, FFN class)
    "llama": (lambda: transformers.LlamaConfig(**DECODER), "mlp", "LlamaMLP"),
    "mistral": (lambda: transformers.MistralConfig(**DECODER), "mlp", "MistralMLP"),
    "qwen2": (lambda: transformers.Qwen2Config(**DECODER), "mlp", "Qwen2MLP"),
    "qwen3": (lambda: transformers.Qwen3Config(**DECODER), "mlp", "Qwen3MLP"),
    "gemma": (lambda: transformers.GemmaConfig(**DECODER), "mlp", "GemmaMLP"),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=50, n_embd=64, n_layer=2, n_head=4, n_positions=32),
             "mlp", "GPT2MLP"),
    "bert": (lambda: transformers.BertConfig(**BERT), "intermediate", "BertIntermediate"),
    "bert_output": (lambda: transformers.BertConfig(**BERT), "layer.*.output", "BertOutput"),  # (hidden, input_tensor)
}


def _model(family):
    make, target, cls = FAMILIES[family]
    torch.manual_seed(0)
    config = make()
    if family.startswith("bert"):
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval(), target, cls


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # (B, L, vocab)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_ffn_routes_tokens_and_stays_exact(family, caplog):
    model, target, cls = _model(family)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, L)
    dense = _logits(model, ids)
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy(model, num_experts=4, k=2, target=target)
    mixtures = [(n, m) for n, m in model.named_modules() if isinstance(m, ModuleMixture)]
    assert len(mixtures) == 2 and all(type(m.experts[0]).__name__ == cls for _, m in mixtures)
    assert all(m.route == "tokens" for _, m in mixtures)
    assert (_logits(model, ids) - dense).abs().max().item() < 1e-5
    assert all(int(m.routing.dropped) == 0 and sum(m.routing.counts) == 2 * 14 for _, m in mixtures)
    for name, m in mixtures:
        assert f"moefy: {name} ({cls}) -> 4 experts, k=2, route=tokens (" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("moefy")]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_per_token_routing_splits_a_sequence(family):
    model, target, _ = _model(family)
    torch.manual_seed(2)
    moefy(model, num_experts=4, k=1, target=target, expert_noise=0.1)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, L)
    _logits(model, ids)
    for m in model.modules():
        if isinstance(m, ModuleMixture):
            idx = m.routing.indices.reshape(2, 7)  # (B, L): one expert per token
            assert any(len(set(row.tolist())) > 1 for row in idx)  # tokens of one sequence, different experts


class CumSum(nn.Module):
    """Mixes positions: a running sum over the sequence (dim 1)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x).cumsum(dim=1)


class SelfMix(nn.Module):
    """Mixes positions yet permutes with them (attention without positions): only the row-subset check sees it."""

    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x


class NeedsMask(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask):
        return self.proj(x) * mask


class Unsized(nn.Module):
    def forward(self, x):
        return x * 2


def test_probe_plain_modules():
    torch.manual_seed(0)
    assert probe_position_wise(SwiGLU(6, 10), 6) is True
    assert probe_position_wise(CumSum(6), 6) is False
    x = torch.randn(2, 5, 6)  # (B, L, D)
    assert torch.allclose(SelfMix()(x[:, [4, 2, 0, 1, 3]]), SelfMix()(x)[:, [4, 2, 0, 1, 3]], atol=1e-6)
    assert probe_position_wise(SelfMix(), 6) is False
    assert infer_routing(SwiGLU(6, 10)) == ("tokens", 6, -1)
    assert infer_routing(CumSum(6)) == ("samples", 6, -1)
    choice = explain_routing(CumSum(6))
    assert choice.reason.startswith("mixes positions") and not choice.unsure
    layer = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5)).train()
    mod = CumSum(6).train()
    explain_routing(mod)
    assert mod.training and all(m.training for m in mod.modules())  # the probe restores train flags
    assert layer.training


def test_moefy_swiglu_exact_per_token_and_cumsum_per_sample(caplog):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6)  # (B, L, D)
    with caplog.at_level(logging.INFO, logger="moefy"):
        net = nn.Sequential()
        net.add_module("ffn", SwiGLU(6, 10))
        net.add_module("mix", CumSum(6))
        dense = net(x)
        moefy(net, num_experts=4, k=2, target=["ffn", "mix"])
    assert net.ffn.route == "tokens" and net.mix.route == "samples"
    assert (net(x) - dense).abs().max().item() < 1e-5
    assert "moefy: ffn (SwiGLU) -> 4 experts, k=2, route=tokens (position-wise: probe" in caplog.text
    assert "moefy: mix (CumSum) -> 4 experts, k=2, route=samples (mixes positions" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("moefy")]


def test_unprobeable_module_warns_and_routes_samples(caplog):
    net = nn.Sequential()
    net.add_module("odd", NeedsMask(6))
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy(net, num_experts=2, target="odd")
    assert net.odd.route == "samples" and net.odd.route_unsure
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "odd (NeedsMask) routes per sample" in warnings[0]
    assert "probe failed (TypeError" in warnings[0] and 'route="tokens"' in warnings[0]
    dense, net2 = NeedsMask(6), nn.Sequential()
    net2.add_module("odd", dense)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy(net2, num_experts=2, target="odd", route="tokens")
    assert net2.odd.route == "tokens" and "route='tokens' given" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("moefy")]
    x, mask = torch.randn(2, 5, 6), torch.rand(2, 5, 1)  # (B, L, D), (B, L, 1): sliced per token
    assert (net2.odd(x, mask) - dense(x, mask)).abs().max().item() < 1e-6


def test_unsized_module_probed_with_the_given_input_dim():
    choice = explain_routing(Unsized())
    assert choice.route == "samples" and choice.unsure and "no input size" in choice.reason
    assert explain_routing(Unsized(), input_dim=6).route == "tokens"
    assert moefy(Unsized(), num_experts=2, input_dim=6).route == "tokens"


def test_attention_routes_samples_without_warning_and_bert_chain_routes_tokens(caplog):
    model, _, _ = _model("llama")
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy(model, num_experts=2, target="self_attn", input_dim=64)
    assert all(m.route == "samples" for m in model.modules() if isinstance(m, ModuleMixture))
    assert "route=samples (contains LlamaAttention: mixes positions)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("moefy")]
    from moefy.convert import moefy_chain
    bert, _, _ = _model("bert")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, L)
    dense = _logits(bert, ids)
    layer = bert.bert.encoder.layer[0]
    chain = moefy_chain(layer, ["intermediate", "output.dense"], num_experts=4, k=2)  # no route given: probed
    assert chain.route == "tokens" and (_logits(bert, ids) - dense).abs().max().item() < 1e-5
