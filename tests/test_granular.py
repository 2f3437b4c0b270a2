"""Fine-grained (granular) upcycling: experts are slices of the dense FFN's hidden neurons (moefy/convert/granular.py).

Exactness at init in float64 (< 1e-10) on LlamaMLP, nn.Sequential and GPT2MLP (Conv1D), the k picks are whole
copies, the slices hold the right neurons, a broken condition is reported (and really breaks it), ``target=``
on a LlamaForCausalLM, save/load bit for bit, merge / unmoefy back to the dense module.
"""
import json
import logging

import pytest
import torch
from torch import nn

import moefy
from moefy.convert.ffn_parts import find_ffn_parts
from moefy.convert.granular import balanced_kmeans, exactness, merged_copies, neuron_groups

transformers = pytest.importorskip("transformers")
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

D, H = 16, 24


def llama_config(**kw):
    return transformers.LlamaConfig(hidden_size=D, intermediate_size=H, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=40, **kw)


def ffn(kind):
    torch.manual_seed(0)
    if kind == "llama":
        m = LlamaMLP(llama_config())
    elif kind == "gpt2":
        m = GPT2MLP(H, transformers.GPT2Config(n_embd=D, resid_pdrop=0.0))
        nn.init.normal_(m.c_fc.bias), nn.init.normal_(m.c_proj.bias)  # non-zero biases: the bias counts once
    else:
        m = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
    return m.double()


def whole_copies(mixture, g):
    """Every token's picks are whole copies: each copy picked appears with all its G slices."""
    idx = mixture.routing.indices  # (T, k)
    copies = idx // g
    return all(torch.bincount(row, minlength=mixture.num_experts // g)[row].eq(g).all() for row in copies)


@pytest.mark.parametrize("kind", ["llama", "seq", "gpt2"])
@pytest.mark.parametrize("split", ["contiguous", "random", "clustered"])
@pytest.mark.parametrize("num_experts,g,k", [(8, 4, 4), (6, 2, 4), (4, 2, 2), (6, 3, 3)])
def test_exact_at_init_float64(kind, split, num_experts, g, k):
    dense = ffn(kind)
    mix = moefy.moefy(dense, num_experts=num_experts, k=k, granularity=g, split=split).double()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    assert mix.exact_at_init and mix.exactness_reason == ""
    assert (mix(x) - dense(x)).abs().max().item() < 1e-10
    assert whole_copies(mix, g)
    assert len(mix.experts) == num_experts and find_ffn_parts(mix.experts[0]).hidden == H // g


def test_slices_hold_their_neurons_down_times_g():
    dense = ffn("llama")
    torch.manual_seed(3)
    mix = moefy.moefy(dense, num_experts=6, k=3, granularity=3, split="random").double()
    torch.manual_seed(3)
    groups = neuron_groups(dense, find_ffn_parts(dense), 3, "random")  # (3, 8): the same draw
    assert sorted(groups.flatten().tolist()) == list(range(H))  # every neuron in exactly one slice
    for e, expert in enumerate(mix.experts):
        c, g = divmod(e, 3)
        rows = groups[g]
        assert torch.equal(expert.gate_proj.weight, dense.gate_proj.weight[rows])
        assert torch.equal(expert.up_proj.weight, dense.up_proj.weight[rows])
        assert torch.equal(expert.down_proj.weight, 3 * dense.down_proj.weight[:, rows])
        assert expert.intermediate_size == 8 and expert.down_proj.in_features == 8
    w = mix.router.gate.weight.view(2, 3, D)  # router rows copied across the 3 slices of each copy
    assert torch.equal(w, w[:, :1].expand_as(w)) and not torch.equal(w[0], w[1])


def test_contiguous_split_and_conv1d_layout():
    dense = ffn("gpt2")
    mix = moefy.moefy(dense, num_experts=2, k=2, granularity=2)
    a, b = mix.experts
    assert torch.equal(a.c_fc.weight, dense.c_fc.weight[:, :12]) and torch.equal(b.c_fc.bias, dense.c_fc.bias[12:])
    assert torch.equal(b.c_proj.weight, 2 * dense.c_proj.weight[12:]) and torch.equal(b.c_proj.bias, dense.c_proj.bias)
    assert (a.c_fc.nf, a.c_proj.nx) == (12, 12)


def test_clustered_split_is_balanced_and_finds_planted_clusters():
    torch.manual_seed(0)
    centers = torch.randn(4, 10) * 10
    truth = torch.randperm(32) % 4  # (32,) 8 points per cluster
    points = centers[truth] + 0.1 * torch.randn(32, 10)
    labels = balanced_kmeans(points.double(), 4)
    assert torch.bincount(labels).tolist() == [8] * 4
    assert all(len(set(labels[truth == c].tolist())) == 1 for c in range(4))  # each planted cluster one label
    seq = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        seq[0].weight.copy_(points)
    groups = neuron_groups(seq, find_ffn_parts(seq), 4, "clustered")  # (4, 8)
    assert sorted(groups.flatten().tolist()) == list(range(32))
    assert all(len(set(truth[row].tolist())) == 1 for row in groups)


def test_broken_condition_is_reported_and_really_breaks_exactness(caplog):
    dense = ffn("seq")
    x = torch.randn(64, D, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="moefy"):
        mix = moefy.moefy(dense, num_experts=4, k=1, granularity=2).double()  # k not a multiple of G
    assert not mix.exact_at_init and "k=1 is not a multiple of granularity=2" in mix.exactness_reason
    assert "not the dense module at init" in caplog.text
    assert (mix(x) - dense(x)).abs().max().item() > 1e-3  # one slice at a time: not the dense FFN
    mix = moefy.moefy(dense, num_experts=8, k=4, granularity=2).double()
    assert mix.exact_at_init
    with torch.no_grad():
        mix.router.gate.weight.normal_()  # rows no longer copied: the picks split copies
    assert exactness(mix) == (False, "router rows differ between the 2 slices of a copy")
    assert (mix(x) - dense(x)).abs().max().item() > 1e-3 and not whole_copies(mix, 2)
    for options, why in ((dict(drop_fraction=0.25), "drop_fraction"), (dict(noise="gumbel"), "noise"),
                         (dict(normalize=False), "normalize"), (dict(num_shared=1), "shared")):
        assert why in moefy.moefy(dense, num_experts=4, k=2, granularity=2, **options).exactness_reason


def llama_lm(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config()).double().eval()


def test_target_llama_model_exact_save_load_unmoefy(tmp_path):
    model, dense = llama_lm(0), llama_lm(0)
    ids = torch.randint(0, 40, (2, 7))
    want = dense(ids).logits
    moefy.moefy(model, num_experts=4, k=2, granularity=2, split="clustered", target=LlamaMLP)
    mixtures = [m for m in model.modules() if isinstance(m, moefy.ModuleMixture)]
    assert len(mixtures) == 2 and all(m.exact_at_init for m in mixtures)
    model.double()
    assert (model(ids).logits - want).abs().max().item() < 1e-10
    with torch.no_grad():  # make the experts differ, so the round trip is not trivially the init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model(ids).logits
    moefy.save(model, tmp_path)
    meta = json.loads((tmp_path / "moefy.json").read_text())
    assert [e["granularity"] for e in meta["conversions"]] == [2, 2]
    loaded = moefy.load(llama_lm(5), tmp_path)
    assert torch.equal(loaded(ids).logits, out)
    assert loaded.model.layers[0].mlp.experts[0].down_proj.weight.shape == (D, H // 2)
    back = moefy.unmoefy(loaded)  # slices concatenated, down / G: the dense structure and keys again
    assert set(back.state_dict()) == set(dense.state_dict())
    assert back.model.layers[1].mlp.gate_proj.weight.shape == (H, D)


def test_merge_rebuilds_each_copy_exactly_even_after_training():
    dense = ffn("gpt2")
    mix = moefy.moefy(dense, num_experts=4, k=2, granularity=2).double()
    merged = moefy.merge(mix, how=1)  # copy 1, contiguous split: the dense module back, bit for bit (× 2 / 2)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), dense.state_dict().values()))
    with pytest.raises(ValueError, match=r"how: expert index must be in \[0, 1\]"):
        moefy.merge(mix, how=2)  # 2 copies, not 4 experts
    one = moefy.moefy(dense, num_experts=3, k=3, granularity=3).double()  # E = G, k = G: all slices, weight 1/G
    with torch.no_grad():
        for p in one.experts.parameters():
            p.add_(0.1 * torch.randn_like(p))  # slices that no longer match: different down biases too
    x = torch.randn(20, D, dtype=torch.float64)
    assert (moefy.merge(one)(x) - one(x)).abs().max().item() < 1e-10
    assert len(merged_copies(one)) == 1


def test_bert_chain_granular():
    cfg = transformers.BertConfig(hidden_size=D, intermediate_size=H, num_hidden_layers=1, num_attention_heads=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    layer = transformers.models.bert.modeling_bert.BertLayer(cfg).double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    want = layer(x)[0] if isinstance(layer(x), tuple) else layer(x)
    moefy.moefy_chain(layer, ["intermediate", "output.dense"], num_experts=4, k=2, granularity=2)
    layer.double()
    got = layer(x)[0] if isinstance(layer(x), tuple) else layer(x)
    assert (got - want).abs().max().item() < 1e-10
    moefy.unmoefy(layer)
    assert layer.intermediate.dense.weight.shape == (H, D) and layer.output.dense.weight.shape == (D, H)


def test_fused_granular_experts():
    dense = ffn("seq")
    mix = moefy.moefy(dense, num_experts=4, k=2, granularity=2, fused=True).double()
    x = torch.randn(10, D, dtype=torch.float64)
    assert (mix(x) - dense(x)).abs().max().item() < 1e-10
