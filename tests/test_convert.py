"""moefy(): a mixture of copies equals the module at init; model-level conversion, merge, checkpoints."""
import collections

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import SwiGLU
from moefy.convert import (AttentionMixture, ModuleMixture, dense_key_map, infer_routing, load_dense_state_dict,
                           merge, moefy, moefy_chain, unmoefy)

F64 = dict(atol=1e-12, rtol=1e-12)  # identical experts: sum_i w_i f(x), sum_i w_i = 1 up to one rounding


class FFNBlock(nn.Module):
    """A transformer FFN sub-block with its residual and norm, taking the residual as a second input."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x, residual):
        return self.norm(self.fc2(F.gelu(self.fc1(x))) + residual)


class ConvBlock(nn.Module):
    """A user CNN block: channels first, a residual that needs the whole image."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.proj = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return self.proj(F.relu(self.norm(self.conv(x))) + x)


class PoolThenProject(nn.Module):
    """Mixes positions (mean over the sequence): only exact when routed per sample."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x - x.mean(dim=1, keepdim=True))


def make_case(kind, rng):
    """(module, inputs) for one module kind with random sizes drawn from ``rng``."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))
    b, l, d, h = r(1, 6), r(1, 5), r(2, 9), r(2, 12)
    if kind == "linear":
        return nn.Linear(d, h), (torch.randn(*[r(1, 3) for _ in range(r(0, 2))], b, d),)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.LayerNorm(h), nn.Linear(h, d)), (torch.randn(b, l, d),)
    if kind == "swiglu":
        return SwiGLU(d, h), (torch.randn(b, l, d),)
    if kind == "ffn_block":
        return FFNBlock(d, h), (torch.randn(b, l, d), torch.randn(b, l, d))
    if kind == "pool":
        return PoolThenProject(d), (torch.randn(b, l, d),)
    if kind == "conv2d":
        return nn.Conv2d(d, h, 3, padding=1), (torch.randn(b, d, r(3, 7), r(3, 7)),)
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(d, h, 3), nn.ReLU()), (torch.randn(b, d, r(3, 9)),)
    if kind == "conv_block":
        return ConvBlock(), (torch.randn(b, 3, r(2, 6), r(2, 6)),)
    if kind == "mha":
        heads = r(1, 3)
        first = bool(r(0, 1))
        q = torch.randn(b, l, 4 * heads) if first else torch.randn(l, b, 4 * heads)
        return nn.MultiheadAttention(4 * heads, heads, batch_first=first), (q, q, q)
    if kind == "encoder_layer":
        return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), (torch.randn(b, l, 8),)
    raise ValueError(kind)


KINDS = ["linear", "mlp", "swiglu", "ffn_block", "pool", "conv2d", "conv1d", "conv_block", "mha", "encoder_layer"]


def outputs(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), num_experts=st.integers(1, 5),
       k_minus=st.integers(0, 4), train=st.booleans(), noise=st.sampled_from([None, "gumbel", "jitter"]))
def test_moefy_equals_module_at_init(kind, seed, num_experts, k_minus, train, noise):
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module, inputs = make_case(kind, rng)
    module, inputs = module.double().train(train), [t.double() for t in inputs]
    if kind == "conv_block":
        module.norm.eval()  # batch statistics over each expert's share differ: see test_batch_statistics_...
    if kind == "mha":
        inputs = [inputs[0]] * 3  # self-attention: the same tensor, as a model passes it
    k = max(1, num_experts - k_minus)
    route = {"swiglu": "tokens", "ffn_block": "tokens"}.get(kind)  # position-wise user modules
    mix = moefy(module, num_experts=num_experts, k=k, noise=noise, route=route)
    want, got = outputs(module(*inputs)), outputs(mix(*inputs))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, **F64)
    r = mix.routing
    assert sum(r.counts) == r.num_tokens * k and int(r.dropped) == 0
    if k == 1:
        assert bool((r.weight == 1.0).all())  # p / stopgrad(p): exactly one, not merely close


@pytest.mark.parametrize("kind", KINDS)
def test_float32_exact_to_rounding(kind):
    module, inputs = make_case(kind, torch.Generator().manual_seed(3))
    module.eval()
    if kind == "mha":
        inputs = [inputs[0]] * 3
    route = "tokens" if kind in ("swiglu",) else None
    mix = moefy(module, num_experts=4, k=2, route=route)
    want, got = outputs(module(*inputs)), outputs(mix(*inputs))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


def test_fused_experts_path():
    torch.manual_seed(0)
    module, x = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double(), torch.randn(3, 20, 8).double()
    mix = moefy(module, num_experts=4, k=2, fused=True)
    assert mix.fused
    torch.testing.assert_close(mix(x), module(x), **F64)


def test_automatic_routing_per_module_kind():
    assert infer_routing(nn.Linear(5, 3)) == ("tokens", 5, -1)
    assert infer_routing(nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 2), nn.ReLU())) == ("tokens", 6, -1)
    assert infer_routing(nn.Conv2d(3, 8, 3)) == ("samples", 3, 1)
    assert infer_routing(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) == ("samples", 3, 1)
    assert infer_routing(nn.MultiheadAttention(8, 2, batch_first=True)) == ("samples", 8, -1)
    assert infer_routing(SwiGLU(7, 3)) == ("tokens", 7, -1)  # probed: acts on every row alone
    assert infer_routing(ConvBlock()) == ("samples", 3, 1)
    assert infer_routing(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2))) == ("samples", 5, 1)
    assert isinstance(moefy(nn.MultiheadAttention(8, 2)), AttentionMixture)


def test_token_route_on_position_mixing_module_is_not_exact():
    """Why unknown modules default to per-sample routing: per token, the module sees lone rows."""
    module, (x,) = make_case("pool", torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, x.shape[-1])
    assert not torch.allclose(moefy(module, route="tokens", input_dim=x.shape[-1])(x), module(x), atol=1e-3)
    torch.testing.assert_close(moefy(module)(x), module(x))


def test_gradients_reach_used_experts_and_router():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    for k, expert_noise, router_grad in [(1, 0.0, True), (2, 0.0, False), (2, 0.05, True)]:
        mix = moefy(module, num_experts=5, k=k, expert_noise=expert_noise).double()
        with torch.no_grad():  # logits (a.x, -a.x, b.x, -b.x, 0): two are > 0, so expert 4 never makes the top 2
            a, b = torch.randn(2, 6, dtype=torch.float64)
            mix.router.gate.weight.copy_(torch.stack([a, -a, b, -b, torch.zeros(6, dtype=torch.float64)]))
        mix(x).pow(2).sum().backward()
        counts = mix.routing.counts
        assert counts[4] == 0 and sum(c > 0 for c in counts) >= 2
        for e, expert in enumerate(mix.experts):
            grads = [p.grad for p in expert.parameters()]
            assert all(g is not None for g in grads)  # idle experts get zeros, not None (DDP)
            assert (max(g.abs().max().item() for g in grads) > 1e-6) == (counts[e] > 0)
        g = mix.router.gate.weight.grad.abs().max().item()
        # k >= 2 over identical experts: y = f(x) * sum_i w_i and sum_i w_i = 1, so the router's
        # gradient is exactly zero in exact arithmetic until the experts differ (k = 1 uses p / sg(p)).
        assert (g > 1e-6) == router_grad, (k, expert_noise, g)


def test_copies_are_deep_and_keep_state():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module(torch.randn(16, 4))  # non-trivial running stats
    module[0].weight.requires_grad_(False)
    module.eval()
    module[1].train()  # a mixed train/eval state is kept as it was
    mix = moefy(module, num_experts=3)
    assert not mix.training and not mix.router.training
    ptrs = {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}
    for e in mix.experts:
        assert [m.training for m in e.modules()] == [m.training for m in module.modules()]
        assert not e[0].weight.requires_grad
        torch.testing.assert_close(e[1].running_mean, module[1].running_mean, atol=0, rtol=0)
        assert not ptrs & ({p.data_ptr() for p in e.parameters()} | {b.data_ptr() for b in e.buffers()})
    before = module[2].weight.clone()
    with torch.no_grad():
        mix.experts[0][2].weight.add_(1.0)
    torch.testing.assert_close(module[2].weight, before, atol=0, rtol=0)
    assert not torch.equal(mix.experts[0][2].weight, mix.experts[1][2].weight)


@pytest.mark.parametrize("options,exact", [
    (dict(k=2), True), (dict(k=4), True), (dict(noise="gaussian"), True), (dict(noise="gumbel", k=2), True),
    (dict(temperature=0.3, k=2), True), (dict(score_func="sigmoid", k=3), True),
    (dict(aux_criterion=["entropy", "switch", "z"]), True), (dict(aggregation="mean"), True),
    (dict(normalize=False, k=2), False), (dict(normalize=False), False), (dict(expert_choice=True), False),
    (dict(aggregation="mean", k=2), False), (dict(expert_noise=0.01), False), (dict(hole=True, k=2), False),
])
def test_which_options_keep_moefy_exact(options, exact):
    torch.manual_seed(2)
    module = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)).double()
    x = torch.randn(64, 6, dtype=torch.float64)
    mix = moefy(module, num_experts=4, **options).double().train()
    if options.get("hole"):
        with torch.no_grad():  # hole logit 0 vs four ~0 logits: in the top 2 for ~5/16 of tokens
            mix.router.gate.weight[4] = 0.0
            mix.router.gate.weight[:4] = torch.randn(4, 6, dtype=torch.float64) * 0.01
    same = torch.allclose(mix(x), module(x), atol=1e-12, rtol=1e-12)
    assert same == exact


def test_batch_statistics_in_training_break_exactness():
    """BatchNorm in training mode normalises over the samples an expert got, not over the batch."""
    torch.manual_seed(0)
    module, x = ConvBlock().double(), torch.randn(6, 3, 5, 5, dtype=torch.float64)
    mix = moefy(module, num_experts=3)
    y = mix(x)
    assert sum(c > 0 for c in mix.routing.counts) > 1  # the batch was split between experts
    assert not torch.allclose(y, module(x), atol=1e-6)
    module.eval()
    torch.testing.assert_close(moefy(module, num_experts=3)(x), module(x), **F64)


# ---------------------------------------------------------------- tuple outputs, side inputs, attention
class TwoHeads(nn.Module):
    Out = collections.namedtuple("Out", "main aux nothing")

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.Out(self.a(x), self.b(x).unsqueeze(-1), None)


def test_tuple_output_every_tensor_mixed():
    torch.manual_seed(0)
    module, x = TwoHeads().double(), torch.randn(5, 7, 4, dtype=torch.float64)
    mix = moefy(module, num_experts=3, k=2, route="tokens")
    got, want = mix(x), module(x)
    assert type(got) is TwoHeads.Out and got.nothing is None and got.aux.shape == (5, 7, 2, 1)
    torch.testing.assert_close(got.main, want.main, **F64)
    torch.testing.assert_close(got.aux, want.aux, **F64)
    with torch.no_grad():  # now experts differ: aux must be mixed with the same weights as main
        for i, e in enumerate(mix.experts):
            e.b.bias.add_(i)
    got = mix(x)
    r = mix.routing
    offset = torch.zeros(35, dtype=torch.float64).index_add_(0, r.token_index, r.weight * r.expert_index.double())
    torch.testing.assert_close(got.aux.reshape(35, 2), want.aux.reshape(35, 2) + offset[:, None], **F64)


def test_side_inputs_sliced_per_token():
    torch.manual_seed(0)
    block = FFNBlock(6, 10).double()
    h, res = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    mix = moefy(block, num_experts=4, k=1, route="tokens")
    torch.testing.assert_close(mix(h, residual=res), block(h, res), **F64)
    torch.testing.assert_close(mix(h, res), block(h, res), **F64)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_masks_cross_attention_and_weights(batch_first):
    torch.manual_seed(0)
    b, l, s, e, heads = 4, 4, 6, 8, 2  # l == b on purpose: a 2-D (L, S) mask must not be sliced per sample
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first).double().eval()
    shape = (lambda n: (b, n, e)) if batch_first else (lambda n: (n, b, e))
    q, kv = torch.randn(*shape(l), dtype=torch.float64), torch.randn(*shape(s), dtype=torch.float64)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -2:] = True
    mask2 = torch.randn(l, s, dtype=torch.float64)
    mask3 = torch.randn(b * heads, l, s, dtype=torch.float64)
    mix = moefy(mha, num_experts=3, k=2)
    for kwargs in [dict(key_padding_mask=pad), dict(attn_mask=mask2), dict(attn_mask=mask3),
                   dict(need_weights=False), dict(average_attn_weights=False, attn_mask=mask3)]:
        want, got = mha(q, kv, kv, **kwargs), mix(q, kv, kv, **kwargs)
        torch.testing.assert_close(got[0], want[0], **F64)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], **F64)


# ---------------------------------------------------------------- model level
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"fc": nn.Linear(8, 8), "mlp": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))})
             for _ in range(2)])
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x).mean(dim=(2, 3))
        for blk in self.blocks:
            h = h + blk["mlp"](blk["fc"](h))
        return self.head(h)


def test_model_level_targets_in_place():
    torch.manual_seed(0)
    net, x = Net().double(), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    want = net(x)
    out = moefy(net, num_experts=3, k=2, target=["mlp", "stem"])
    assert out is net
    assert isinstance(net.stem, ModuleMixture) and net.stem.route == "samples" and net.stem.feature_dim == 1
    assert [net.blocks[i]["mlp"].route for i in range(2)] == ["tokens", "tokens"]
    assert [m.layer_id for m in (net.stem, net.blocks[0]["mlp"], net.blocks[1]["mlp"])] == [0, 1, 2]
    assert isinstance(net.blocks[0]["fc"], nn.Linear) and isinstance(net.head, nn.Linear)
    torch.testing.assert_close(net(x), want, **F64)
    # outermost match wins; modules inside a mixture are never converted again
    moefy(net, target=nn.Linear)
    assert isinstance(net.blocks[0]["fc"], ModuleMixture) and isinstance(net.head, ModuleMixture)
    assert isinstance(net.blocks[0]["mlp"].experts[0][0], nn.Linear)
    torch.testing.assert_close(net(x), want, **F64)


def test_target_patterns_and_predicates():
    names = lambda net: sorted(n for n, m in net.named_modules() if isinstance(m, ModuleMixture))
    assert names(moefy(Net(), target="blocks.*.fc")) == ["blocks.0.fc", "blocks.1.fc"]
    assert names(moefy(Net(), target="blocks.1.*")) == ["blocks.1.fc", "blocks.1.mlp"]  # outermost wins
    assert names(moefy(Net(), target=["blocks.*.mlp.0", "head"])) == ["blocks.0.mlp.0", "blocks.1.mlp.0", "head"]
    with pytest.raises(ValueError, match="matched no submodule"):
        moefy(Net(), target="blocks.*.0")  # '*' stays inside one component: 'blocks.0.mlp.0' has two
    assert names(moefy(Net(), target="blocks.**.0")) == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert names(moefy(Net(), target=(nn.Conv2d,))) == ["stem"]
    assert names(moefy(Net(), target=lambda n, m: n.endswith("head"))) == ["head"]


def test_merge_and_unmoefy():
    torch.manual_seed(0)
    net, x = Net().double(), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    want = net(x)
    moefy(net, num_experts=3, target=["mlp", "head"])
    with torch.no_grad():
        for i, e in enumerate(net.head.experts):
            e.weight.add_(float(i))  # head weights become w + 0, w + 1, w + 2
    head_w = net.head.experts[0].weight.detach().clone()
    torch.testing.assert_close(merge(net.head).weight, head_w + 1.0, **F64)
    torch.testing.assert_close(merge(net.head, 2).weight, head_w + 2.0, **F64)
    torch.testing.assert_close(merge(net.head, [1, 0, 3]).weight, head_w + 1.5, **F64)
    dense = unmoefy(net)
    assert dense is net and not any(isinstance(m, ModuleMixture) for m in net.modules())
    assert type(net.blocks[0]["mlp"]) is nn.Sequential and not hasattr(net.head, "expert_id")
    # averaged mlp copies are the original mlp; the head is (W + 1) h + b = W h + b + sum(h)
    torch.testing.assert_close(net(x), want + _features(net, x).sum(-1, keepdim=True), **F64)


def _features(net, x):
    h = net.stem(x).mean(dim=(2, 3))
    for blk in net.blocks:
        h = h + blk["mlp"](blk["fc"](h))
    return h


def test_moefy_chain_merges_back_to_original_structure():
    torch.manual_seed(0)
    parent = nn.ModuleDict({"up": nn.Sequential(nn.Linear(4, 9), nn.GELU()), "down": nn.Linear(9, 4)}).double()
    keys = sorted(parent.state_dict())
    x = torch.randn(6, 4, dtype=torch.float64)
    want = parent["down"](parent["up"](x))
    mix = moefy_chain(parent, ["up", "down"], num_experts=3, k=2)
    assert parent["up"] is mix and isinstance(parent["down"], nn.Identity)
    torch.testing.assert_close(parent["down"](parent["up"](x)), want, **F64)
    assert dense_key_map(parent)["up.experts.2.1.weight"] == "down.weight"
    assert dense_key_map(parent)["up.experts.2.0.0.bias"] == "up.0.bias"
    unmoefy(parent)
    assert sorted(parent.state_dict()) == keys
    torch.testing.assert_close(parent["down"](parent["up"](x)), want, **F64)


# ---------------------------------------------------------------- checkpoints
def test_moefied_checkpoint_loads_into_fresh_moefied_model():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 3, 6, 6)
    moefy(net, num_experts=3, k=2, target=["mlp", "stem"], noise="gaussian")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts and routers all differ from init
    net.eval()
    fresh = moefy(Net(), num_experts=3, k=2, target=["mlp", "stem"], noise="gaussian").eval()
    assert not torch.allclose(fresh(x), net(x))
    fresh.load_state_dict(net.state_dict())  # strict
    torch.testing.assert_close(fresh(x), net(x), atol=0, rtol=0)


def test_dense_checkpoint_loads_into_mixture():
    torch.manual_seed(0)
    dense, x = Net().double(), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    sd = dense.state_dict()
    torch.manual_seed(1)
    mixed = moefy(Net().double(), num_experts=3, k=2, target=["mlp", "stem"])
    gate = mixed.stem.router.gate.weight.detach().clone()
    missing, unexpected = load_dense_state_dict(mixed, sd)
    assert missing == [] and unexpected == []
    for e in range(3):
        torch.testing.assert_close(mixed.blocks[1]["mlp"].experts[e][2].weight, sd["blocks.1.mlp.2.weight"],
                                   atol=0, rtol=0)
        torch.testing.assert_close(mixed.stem.experts[e].bias, sd["stem.bias"], atol=0, rtol=0)
    torch.testing.assert_close(mixed.stem.router.gate.weight, gate, atol=0, rtol=0)  # router kept
    torch.testing.assert_close(mixed(x), dense(x), **F64)
    with pytest.raises(RuntimeError, match=r"missing keys \['head.weight'\]"):
        load_dense_state_dict(mixed, {k: v for k, v in sd.items() if k != "head.weight"})
    missing, unexpected = load_dense_state_dict(mixed, {**sd, "extra": torch.zeros(1)}, strict=False)
    assert missing == [] and unexpected == ["extra"]


# ---------------------------------------------------------------- bad input
class ReturnsDict(nn.Linear):
    def forward(self, x):
        return {"y": super().forward(x)}


class ReturnsCount(nn.Linear):
    def forward(self, x):
        return super().forward(x), 3


@pytest.mark.parametrize("call,error,match", [
    (lambda: moefy(nn.Linear(4, 2), num_experts=3, k=4), ValueError, r"k must be a number in \[1, 3\]"),
    (lambda: moefy(nn.Linear(4, 2), num_experts=0), ValueError, r"num_experts must be an int >= 1, got 0"),
    (lambda: moefy(nn.Linear(4, 2), num_experts=-2), ValueError, r"num_experts must be an int >= 1"),
    (lambda: moefy(nn.Linear(4, 2), num_experts=2.0), ValueError, r"num_experts must be an int >= 1"),
    (lambda: moefy(nn.Linear(4, 2), num_experts=True), ValueError, r"num_experts must be an int >= 1"),
    (lambda: moefy(nn.Linear(4, 2), expert_noise=-0.1), ValueError, r"expert_noise must be a number >= 0"),
    (lambda: moefy(Net(), target="decoder"), ValueError, r"target 'decoder' matched no submodule of Net; "
                                                          r"module names look like \['stem', 'blocks'"),
    (lambda: moefy(Net(), target=42), TypeError, r"target must be a name pattern"),
    (lambda: moefy(Net(), target=int), TypeError, r"module types must subclass nn.Module"),
    (lambda: moefy("linear"), TypeError, r"module must be an nn.Module, got str"),
    (lambda: moefy(moefy(nn.Linear(4, 2))), TypeError, r"already a mixture"),
    (lambda: moefy(nn.Tanh()), ValueError, r"input_dim: cannot infer"),
    (lambda: moefy(nn.LSTM(4, 3)), ValueError, r"batch_first=False"),
    (lambda: moefy(nn.TransformerEncoderLayer(8, 2)), ValueError, r"batch_first=False"),
    (lambda: moefy(nn.MultiheadAttention(8, 2), route="tokens"), ValueError, r"routed per sample"),
    (lambda: moefy(ReturnsDict(4, 2))(torch.randn(3, 4)), TypeError, r"returned dict: a mixture can only combine"),
    (lambda: moefy(ReturnsCount(4, 2))(torch.randn(3, 4)), TypeError, r"item 1 is int"),
    (lambda: moefy(nn.MultiheadAttention(8, 2))(*[torch.randn(5, 8)] * 3), ValueError, r"batched 3-D"),
    (lambda: moefy(nn.Conv2d(3, 4, 3))(torch.randn(3, 7, 7)), ValueError, r"must be batched"),
    (lambda: moefy(nn.Linear(4, 2))(torch.randn(3, 5)), ValueError, r"input_dim=4"),
    (lambda: merge(moefy(nn.Linear(4, 2), num_experts=2), 2), ValueError, r"expert index must be in \[0, 1\]"),
    (lambda: merge(moefy(nn.Linear(4, 2), num_experts=2), "max"), ValueError, r"how must be 'mean'"),
    (lambda: merge(moefy(nn.Linear(4, 2), num_experts=2), [1, -1]), ValueError, r"2 non-negative numbers"),
    (lambda: merge(nn.Linear(4, 2)), TypeError, r"mixture must be a MoEBlock"),
    (lambda: moefy_chain(nn.ModuleDict({"a": nn.Linear(2, 2)}), ["a", "b"]), ValueError, r"no submodule 'b'"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_expert_noise_is_relative_and_breaks_symmetry():
    torch.manual_seed(0)
    module = nn.Linear(64, 64)
    with torch.no_grad():
        module.weight.mul_(10.0)
    mix = moefy(module, num_experts=3, expert_noise=0.1)
    rms = module.weight.square().mean().sqrt()
    for e in mix.experts:
        ratio = ((e.weight - module.weight).std() / rms).item()
        assert 0.09 < ratio < 0.11
    assert not torch.equal(mix.experts[0].weight, mix.experts[1].weight)
