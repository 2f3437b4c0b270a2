"""Drop-upcycling (moefy/convert/drop_upcycling.py): round(r·H) neurons of every expert re-initialised from the
original matrices' statistics, the same indices in gate/up rows and down columns, the rest bit for bit."""
import json

import pytest
import torch
from torch import nn

import moefy
from moefy.convert.drop_upcycling import drop_upcycle

transformers = pytest.importorskip("transformers")
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402


def llama_config(d=16, h=40, **kw):
    return transformers.LlamaConfig(hidden_size=d, intermediate_size=h, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=40, **kw)


def changed(new, old, dim):
    """(H,) bool: the neurons (slices along ``dim``) where every value differs; asserts the rest are equal."""
    diff = (new != old).movedim(dim, 0).flatten(1)  # (H, rest)
    some, every = diff.any(1), diff.all(1)
    assert torch.equal(some, every), "a neuron is partly re-initialised"
    return every


def neurons(expert, dense, names_dims):
    sets = [changed(expert.get_submodule(n).weight, dense.get_submodule(n).weight, d) for n, d in names_dims]
    assert all(torch.equal(s, sets[0]) for s in sets), "the matrices of one expert re-initialise different neurons"
    return sets[0]


LLAMA = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))
GPT2 = (("c_fc", 1), ("c_proj", 0))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "seq"])
@pytest.mark.parametrize("r,h,n", [(0.3, 40, 12), (0.25, 10, 3), (1.0, 40, 40), (0.01, 40, 0)])
def test_fraction_and_placement(kind, r, h, n):
    torch.manual_seed(0)
    if kind == "llama":
        dense, layers = LlamaMLP(llama_config(h=h)), LLAMA
    elif kind == "gpt2":
        dense, layers = GPT2MLP(h, transformers.GPT2Config(n_embd=16)), GPT2
    else:
        dense, layers = nn.Sequential(nn.Linear(16, h), nn.GELU(), nn.Linear(h, 16)), (("0", 0), ("2", 1))
    mix = moefy.moefy(dense, num_experts=4, k=2, drop_fraction=r)
    sets = [neurons(e, dense, layers) for e in mix.experts]
    assert [int(s.sum()) for s in sets] == [n] * 4  # round(r·H), half up (0.25 · 10 = 2.5 -> 3)
    if 0 < n < h:
        assert len({tuple(s.tolist()) for s in sets}) == 4  # a new draw per expert
    for e in mix.experts:  # biases and everything else untouched
        for name, b in dense.named_parameters():
            if name.endswith("bias"):
                assert torch.equal(e.get_parameter(name), b)
    assert not mix.exact_at_init and "drop_fraction" in mix.exactness_reason


def test_indices_returned_and_reproducible():
    torch.manual_seed(0)
    dense = LlamaMLP(llama_config())
    experts = [LlamaMLP(llama_config()) for _ in range(3)]
    for e in experts:
        e.load_state_dict(dense.state_dict())
    torch.manual_seed(7)
    chosen = drop_upcycle(experts, dense, 0.5)
    for e, idx in zip(experts, chosen):
        assert idx.shape == (20,) and torch.equal(torch.nonzero(neurons(e, dense, LLAMA)).flatten(), idx.sort().values)
    torch.manual_seed(7)
    again = moefy.moefy(dense, num_experts=3, drop_fraction=0.5)
    assert all(torch.equal(a.down_proj.weight, b.down_proj.weight) for a, b in zip(again.experts, experts))


def test_reinitialised_values_have_the_original_mean_and_std():
    torch.manual_seed(0)
    dense = LlamaMLP(llama_config(d=256, h=1024))
    moments = {"gate_proj": (0.5, 2.0), "up_proj": (-0.3, 0.5), "down_proj": (1.0, 0.1)}
    with torch.no_grad():
        for name, (mean, std) in moments.items():
            dense.get_submodule(name).weight.normal_(mean, std)
    mix = moefy.moefy(dense, num_experts=4, k=2, drop_fraction=0.5)
    for name, dim in LLAMA:
        w = dense.get_submodule(name).weight.double()
        mean, std = w.mean().item(), w.std().item()
        fresh = []
        for e in mix.experts:
            new = e.get_submodule(name).weight.double()
            rows = changed(new, dense.get_submodule(name).weight, dim)
            fresh.append(new.index_select(dim, torch.nonzero(rows).flatten()).flatten())
        fresh = torch.cat(fresh)  # 4 experts · 512 neurons · 256 values = 524288 draws
        assert fresh.numel() == 4 * 512 * 256
        # standard errors: std/724 for the mean, std/1024 for the std; tolerances > 14 of them
        assert abs(fresh.mean().item() - mean) < 0.02 * std, name
        assert abs(fresh.std().item() / std - 1) < 0.02, name


def test_drop_on_granular_slices():
    torch.manual_seed(0)
    dense = LlamaMLP(llama_config(h=40))
    mix = moefy.moefy(dense, num_experts=4, k=2, granularity=2, drop_fraction=0.5)
    for e, expert in enumerate(mix.experts):
        rows = torch.arange(20) + 20 * (e % 2)  # contiguous slices
        ref = LlamaMLP(llama_config(h=20))
        ref.gate_proj.weight.data, ref.up_proj.weight.data = dense.gate_proj.weight[rows], dense.up_proj.weight[rows]
        ref.down_proj.weight.data = 2 * dense.down_proj.weight[:, rows]
        assert int(neurons(expert, ref, LLAMA).sum()) == 10


def test_target_model_save_load(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    moefy.moefy(model, num_experts=4, k=2, drop_fraction=0.25, target=LlamaMLP)
    ids = torch.randint(0, 40, (2, 6))
    out = model(ids).logits
    moefy.save(model, tmp_path)
    meta = json.loads((tmp_path / "moefy.json").read_text())
    assert [e["granularity"] for e in meta["conversions"]] == [1, 1]
    torch.manual_seed(1)
    loaded = moefy.load(transformers.LlamaForCausalLM(llama_config()).eval(), tmp_path)
    assert torch.equal(loaded(ids).logits, out)
