"""Experts from several modules (Branch-Train-MiX / mergekit-moe): moefy(..., experts_from=[...]) on plain modules
and on tiny random Llamas: the experts are their sources bit for bit, a router pinned on expert i gives source
i's outputs, rest="average" is the mean, save / load round-trips, and mismatches are refused by name."""
import logging

import pytest
import torch
from torch import nn

import moefy
from moefy.convert import ModuleMixture

transformers = pytest.importorskip("transformers")


def mlp(seed, hidden=8, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, 4, bias=bias))


def pin(model, i):
    """Every mixture of ``model`` sends every token to expert i alone (weight 1): a zero gate, so all scores
    tie, and a selection bias that only expert i gets."""
    with torch.no_grad():
        for m in moefy.moe_blocks(model):
            m.router.gate.weight.zero_()
            m.router.score_correction_bias.zero_()[i] = 1e3


# ------------------------------------------------------------------------------------------- module level
def test_module_level_experts_are_copies_of_their_sources_bit_for_bit():
    base, sources = mlp(0), [mlp(1), mlp(2), mlp(3)]
    mix = moefy.moefy(base, experts_from=sources, k=1)
    assert isinstance(mix, ModuleMixture) and mix.num_experts == 3 and mix.input_dim == 4
    for expert, source in zip(mix.experts, sources):
        own, theirs = expert.state_dict(), source.state_dict()
        assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
        assert expert is not source and expert[0].weight.data_ptr() != source[0].weight.data_ptr()
    assert moefy.moefy(base, 3, experts_from=sources).num_experts == 3  # num_experts may be given: = len


@pytest.mark.parametrize("i", [0, 1, 2])
def test_module_level_pinned_router_gives_source_i(i):
    sources = [mlp(1), mlp(2), mlp(3)]
    mix = moefy.moefy(mlp(0), experts_from=sources, k=1, selection_bias=True).eval()
    pin(mix, i)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(mix(x), sources[i](x))


def test_module_level_refuses_mismatches_by_name():
    with pytest.raises(ValueError, match=r"experts_from\[1\] \(Sequential\) parameter '0.weight' has shape \(16, 4\), "
                                         r"the base's \(8, 4\)"):
        moefy.moefy(mlp(0), experts_from=[mlp(1), mlp(2, hidden=16)])
    with pytest.raises(ValueError, match=r"experts_from\[0\] \(Sequential\) has no parameter '0.bias'"):
        moefy.moefy(mlp(0), experts_from=[mlp(1, bias=False)])
    with pytest.raises(ValueError, match=r"experts_from\[0\] \(Sequential\) has a parameter '0.bias' that the base"):
        moefy.moefy(mlp(0, bias=False), experts_from=[mlp(1)])
    for cut in ({"granularity": 2}, {"drop_fraction": 0.5}):
        with pytest.raises(ValueError, match="experts_from: granularity and drop_fraction cut or re-initialise"):
            moefy.moefy(mlp(0), experts_from=[mlp(1), mlp(2)], **cut)
    with pytest.raises(ValueError, match=r"num_experts=4 but experts_from holds 2 modules"):
        moefy.moefy(mlp(0), 4, experts_from=[mlp(1), mlp(2)])
    with pytest.raises(ValueError, match=r"rest='average' needs target"):
        moefy.moefy(mlp(0), experts_from=[mlp(1)], rest="average")


# -------------------------------------------------------------------------------------------- model level
CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=2)


def llama(seed, **cfg):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CFG, **cfg})).eval()


def branches(base, n=2):
    """n models equal to ``base`` outside their MLPs, with MLPs of their own (a branch of Branch-Train-MiX)."""
    out = []
    for s in range(n):
        m = llama(10 + s)
        state = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
        m.load_state_dict(state, strict=False)
        out.append(m)
    return out


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def test_model_level_experts_are_the_models_mlps_and_rest_base_keeps_the_base():
    base = llama(0)
    a, b = llama(1), llama(2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    moefy.moefy(base, target="mlp", experts_from=[a, b], rest="base")
    for layer in range(2):
        mix = base.model.layers[layer].mlp
        assert isinstance(mix, ModuleMixture) and mix.num_experts == 2
        for expert, src in zip(mix.experts, (a, b)):
            theirs = src.model.layers[layer].mlp.state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in expert.state_dict().items())
    after = base.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if ".mlp." not in k)


@pytest.mark.parametrize("i", [0, 1])
def test_model_level_pinned_router_gives_model_i(i):
    base = llama(0)
    models = branches(base)
    moefy.moefy(base, target="mlp", experts_from=models, rest="base", k=1, selection_bias=True)
    pin(base, i)
    with torch.no_grad():
        got, want = base(IDS).logits, models[i](IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(want, models[1 - i](IDS).logits, atol=1e-3)  # the two branches do differ


def test_rest_average_is_the_mean_of_the_models_and_logged(caplog):
    base, models = llama(0), [llama(1), llama(2), llama(3)]
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy.moefy(base, target="mlp", experts_from=models, rest="average")
    assert "outside the targets" in caplog.text and "element-wise mean of the 3 experts_from models" in caplog.text
    states = [m.state_dict() for m in models]
    after = base.state_dict()
    outside = [k for k in states[0] if ".mlp." not in k]
    assert len(outside) > 10
    for key in outside:
        mean = torch.stack([s[key].double() for s in states]).mean(0)
        assert torch.equal(after[key], mean.to(after[key].dtype)), key  # the float64 mean, rounded once
    with torch.no_grad():  # and the model still runs
        assert base(IDS).logits.shape == (2, 7, 64)


def test_rest_base_is_logged(caplog):
    base = llama(0)
    with caplog.at_level(logging.INFO, logger="moefy"):
        moefy.moefy(base, target="mlp", experts_from=[llama(1), llama(2)])
    assert "outside the targets" in caplog.text and "the base model's own weights" in caplog.text


def test_save_load_round_trips_experts_from(tmp_path):
    base = llama(0)
    moefy.moefy(base, target="mlp", experts_from=[llama(1), llama(2)], rest="average", k=1)
    moefy.save(base, tmp_path)
    loaded = moefy.load(llama(5), tmp_path).eval()
    own, theirs = base.state_dict(), loaded.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, loaded(IDS).logits)


def test_model_level_refuses_other_architectures_and_bad_arguments():
    with pytest.raises(ValueError, match=r"experts_from\[1\] \(LlamaForCausalLM\) state_dict entry "
                                         r"'model.layers.0.mlp.gate_proj.weight' has shape \(48, 16\), the base's "
                                         r"\(32, 16\).*share the base model's architecture"):
        moefy.moefy(llama(0), target="mlp", experts_from=[llama(1), llama(2, intermediate_size=48)])
    with pytest.raises(ValueError, match=r"experts_from\[0\] \(LlamaForCausalLM\) has no state_dict entry "
                                         r"'model.layers.1"):
        moefy.moefy(llama(0), target="mlp", experts_from=[llama(1, num_hidden_layers=1)])
    with pytest.raises(ValueError, match=r"rest must be one of \('base', 'average'\)"):
        moefy.moefy(llama(0), target="mlp", experts_from=[llama(1)], rest="mean")
    with pytest.raises(ValueError, match=r"num_experts=3 but experts_from "
                                         r"holds 2"):
        moefy.moefy(llama(0), 3, target="mlp", experts_from=[llama(1), llama(2)])
    with pytest.raises(TypeError, match=r"experts_from must be a list of nn.Module"):
        moefy.moefy(llama(0), target="mlp", experts_from=llama(1))
    with pytest.raises(TypeError, match=r"experts_from\[1\] must be an nn.Module"):
        moefy.moefy(llama(0), target="mlp", experts_from=[llama(1), "llama"])
    with pytest.raises(ValueError, match=r"experts_from must hold at least one module"):
        moefy.moefy(llama(0), target="mlp", experts_from=[])
