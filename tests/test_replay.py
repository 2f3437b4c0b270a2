"""Router replay: recorded picks come back exactly, with recomputed or frozen weights checked by hand."""
import pytest
import torch
from torch import nn

from conftest import LinearMixture
from moefy.routing import Replayed, RouterReplay


def block(**kw):
    torch.manual_seed(0)
    return LinearMixture(4, 3, 4, **kw)


def by_hand(b, x, indices, weights):
    """y_t = Σ_j weights[t, j] · expert_{indices[t, j]}(x_t), the hole (column E) giving zero."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(3)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            if e < b.num_experts:
                y = y + weights[t, j] * b.experts[e](x[t])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("noise", ["gumbel", "simple"])
def test_replay_reproduces_noisy_training_picks_exactly(noise):
    b = block(k=2, noise=noise).train()
    x = torch.randn(64, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    recorded = b.routing.indices.clone()
    b(x)
    assert not torch.equal(b.routing.indices, recorded)  # a fresh noisy forward routes differently
    for _ in range(2):  # every replay() starts again from the first recorded call
        with replay.replay():
            b(x)
        assert torch.equal(b.routing.indices, recorded)
    r = b.routing  # recompute: this forward's (noisy) scores at the recorded columns, renormalised
    picked = r.probs.gather(-1, recorded)
    torch.testing.assert_close(r.weights, picked / picked.sum(-1, keepdim=True))


@pytest.mark.parametrize("mode,normalize", [("recompute", True), ("recompute", False), ("frozen", True)])
def test_replay_weights_values_and_gradients_by_hand(mode, normalize):
    b = block(k=2, normalize=normalize)
    x = torch.randn(6, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    indices, recorded = b.routing.indices.clone(), b.routing.weights.detach().clone()
    with torch.no_grad():  # a policy update changed the router since the rollout
        b.router.gate.weight.add_(torch.randn_like(b.router.gate.weight))
    with replay.replay(weights=mode):
        y = b(x)
    assert torch.equal(b.routing.indices, indices)
    if mode == "recompute":
        p = (x @ b.router.gate.weight.t()).softmax(-1).gather(-1, indices)
        weights = p / p.sum(-1, keepdim=True) if normalize else p
    else:
        weights = recorded
    want = by_hand(b, x, indices, weights)
    torch.testing.assert_close(y, want)
    probe = torch.randn_like(y)
    gate = b.router.gate.weight
    (y * probe).sum().backward()
    got = gate.grad
    if mode == "frozen":
        assert got is None or not got.any()
        return
    got = got.clone()
    gate.grad = None
    (by_hand(b, x, indices, weights) * probe).sum().backward()
    torch.testing.assert_close(got, gate.grad)


def test_replay_keeps_every_slot_counted_with_a_hole():
    b = block(k=2, hole=True, noise="gumbel").train()
    x = torch.randn(2, 9, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    counts = b.routing.counts
    with replay.replay():
        b(x)
    r = b.routing
    assert r.counts == counts
    assert int(r.load.sum()) + int(r.dropped) == 18 * 2


def test_replay_with_token_mask_refers_to_routed_tokens():
    b = block(k=1, noise="gumbel").train()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    replay = RouterReplay(b)
    with replay.record():
        b(x, token_mask=mask)
    recorded = b.routing.indices.clone()
    assert recorded.shape == (7, 1)
    with replay.replay():
        y = b(x, token_mask=mask)
    assert torch.equal(b.routing.indices, recorded)
    assert not y[~mask].any()
    with pytest.raises(ValueError, match=r"shape \(7, 1\).*T=10"), replay.replay():
        b(x)  # no mask: 10 routed tokens, the record has 7


def test_replay_shape_mismatch_names_the_argument():
    b = block(k=2)
    replay = RouterReplay(b)
    with replay.record():
        b(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"indices .*T=6"), replay.replay():
        b(torch.randn(6, 4))
    call = replay.records["."][0]
    replay.records["."][0] = Replayed(call.indices[:, :1], call.weights[:, :1])
    with pytest.raises(ValueError, match=r"k=1 .*k=2"), replay.replay():
        b(torch.randn(5, 4))


def two_recorded_calls():
    """Two noisy mixtures in a row (k=1, then k=2) and a replay that recorded two forwards, of x1 then x2 (8, 4)."""
    torch.manual_seed(0)
    model = nn.Sequential(LinearMixture(4, 4, 3, k=1, noise="gumbel"), LinearMixture(4, 4, 3, k=2, noise="gumbel"))
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    replay = RouterReplay(model)
    with replay.record():
        model(x1)
        model(x2)
    return model, x1, x2, replay


def test_replay_every_block_in_call_order_and_errors():
    model, x1, x2, replay = two_recorded_calls()
    assert [len(v) for v in replay.records.values()] == [2, 2]
    want = [(m.routing.indices.clone()) for m in model]
    with replay.replay():
        model(x1)
        model(x2)
        assert all(torch.equal(m.routing.indices, w) for m, w in zip(model, want))
        with pytest.raises(RuntimeError, match="recorded 2 call"):
            model(x1)
    assert all(m.router_replay is None for m in model)  # the context cleans up, errors or not
    with pytest.raises(ValueError, match="weights must be one of"):
        with replay.replay(weights="fresh"):
            pass
    with pytest.raises(RuntimeError, match="nothing recorded"):
        with RouterReplay(model).replay():
            pass


def test_replay_rejects_expert_choice_and_non_models():
    with pytest.raises(ValueError, match="token choice only"):
        RouterReplay(block(expert_choice=True, k=1.0))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        RouterReplay("model")
    with pytest.raises(ValueError, match="no MoEBlock"):
        RouterReplay(nn.Linear(2, 2))


def test_replay_recomputes_under_activation_checkpointing():
    # without the RNG state restored, the recomputed forward would draw new noise and route differently
    b = block(k=2, noise="gumbel").train()
    x = torch.randn(16, 4, requires_grad=True)
    replay = RouterReplay(b)
    with replay.record():
        y = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=True, preserve_rng_state=False)
    recorded = b.routing.indices.clone()
    probe = torch.randn_like(y)
    torch.manual_seed(7)
    with replay.replay():
        (y * probe).sum().backward()  # the recomputed forward takes the recorded picks
    assert torch.equal(b.routing.indices, recorded)
    got, x.grad = x.grad.clone(), None
    torch.manual_seed(7)  # the same noise, no checkpoint: the same gradient
    with replay.replay():
        (b(x) * probe).sum().backward()
    torch.testing.assert_close(got, x.grad)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_replay_drops_the_slots_the_recorded_forward_dropped(policy):
    """With a token-choice capacity the replay keeps exactly the recorded kept set, even after the router
    changed (the capacity ranks the picks by the recorded scores)."""
    b = block(k=2, noise="gumbel", token_capacity_factor=0.6, drop_policy=policy).train()
    x = torch.randn(40, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    want = b.routing
    assert int(want.dropped) > 0  # C = ceil(0.6 · 40 · 2 / 4) = 12 < the fullest expert's picks
    with torch.no_grad():
        b.router.gate.weight.add_(torch.randn_like(b.router.gate.weight))  # the policy has moved
    with replay.replay():
        b(x)
    got = b.routing
    assert torch.equal(got.token_index, want.token_index) and torch.equal(got.expert_index, want.expert_index)
    assert got.counts == want.counts and int(got.dropped) == int(want.dropped)
    assert sum(got.counts[:4]) + int(got.dropped) == 40 * 2


# ---------------------------------------------------------------- issue 22: replay reproduces exactly
NOISE_MODES = {
    "none": {}, "gumbel": dict(noise="gumbel"), "gaussian": dict(noise="gaussian"), "jitter": dict(noise="jitter"),
    "simple": dict(noise="simple"),
    "gumbel-sigmoid-temperature": dict(noise="gumbel", score_func="sigmoid", temperature=0.5),
    "gaussian-capacity": dict(noise="gaussian", token_capacity_factor=0.6),
    "simple-capacity-temperature": dict(noise="simple", token_capacity_factor=0.6, temperature=2.0),
}


def two_blocks(**kw):
    """Two noisy mixtures in a row: the first block's gradients pass through the second's router."""
    torch.manual_seed(0)
    return nn.Sequential(LinearMixture(6, 6, 4, k=2, **kw), nn.Tanh(), LinearMixture(6, 6, 4, k=2, **kw)).train()


def grads(model, x=None):
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if x is not None:
        out["x"] = x.grad.clone()
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    assert any("router" in name for name in want) and any("experts" in name for name in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("mode", list(NOISE_MODES))
def test_replayed_forward_gives_the_recorded_outputs_and_gradients(mode):
    """Unchanged parameters: a replay (another RNG state) gives the recorded outputs and the same gradients
    (router, Gaussian noise std, experts of both blocks)."""
    model = two_blocks(**NOISE_MODES[mode])
    x, probe = torch.randn(24, 6), torch.randn(24, 6)
    replay = RouterReplay(model)
    torch.manual_seed(1)
    with replay.record():
        want = model(x)
    (want * probe).sum().backward()
    want_grads = grads(model)
    if "capacity" in mode:
        assert int(model[0].routing.dropped) > 0
    torch.manual_seed(2)
    with replay.replay():
        got = model(x)
    (got * probe).sum().backward()
    torch.testing.assert_close(got, want)
    assert_same_grads(grads(model), want_grads)


@pytest.mark.parametrize("noise", ["gumbel", "gaussian"])
def test_replay_applies_the_recorded_noise_to_the_current_router(noise):
    """After a policy update the replay adds the recorded draws to the new logits (Gaussian: the recorded
    standard normals times the new learned std)."""
    b = block(k=2, noise=noise).train()
    x = torch.randn(12, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    r = b.routing
    draws = (r.noisy_logits - r.logits) / (r.noise_std if noise == "gaussian" else 1.0)
    with torch.no_grad():
        b.router.gate.weight.add_(torch.randn_like(b.router.gate.weight))
        if noise == "gaussian":
            b.router.noise_std.weight.add_(torch.randn_like(b.router.noise_std.weight))
    with replay.replay():
        b(x)
    r = b.routing
    got = (r.noisy_logits - r.logits) / (r.noise_std if noise == "gaussian" else 1.0)
    torch.testing.assert_close(got, draws, rtol=1e-4, atol=1e-4)  # the subtraction cancels digits


def step_without_checkpointing(mode):
    """two_blocks of a NOISE_MODES entry, x (24, 6) that requires grad (its grad cleared), probe (24, 6), and the
    gradients (``grads(model, x)``) of ``sum(model(x) * probe)`` drawing the noise from seed 3."""
    model = two_blocks(**NOISE_MODES[mode])
    x, probe = torch.randn(24, 6, requires_grad=True), torch.randn(24, 6)
    torch.manual_seed(3)
    (model(x) * probe).sum().backward()
    want = grads(model, x)
    x.grad = None
    return model, x, probe, want


@pytest.mark.parametrize("preserve_rng_state", [True, False])
@pytest.mark.parametrize("mode", list(NOISE_MODES))
def test_readme_checkpoint_recipe_equals_the_step_without_checkpointing(mode, preserve_rng_state):
    """README "Router replay": record a reentrant-checkpointed forward, backward() inside replay(): the
    gradients of the same step without checkpointing."""
    model, x, probe, want = step_without_checkpointing(mode)
    replay = RouterReplay(model)
    torch.manual_seed(3)
    with replay.record():
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True, preserve_rng_state=preserve_rng_state)
    torch.manual_seed(4)
    with replay.replay():
        (y * probe).sum().backward()
    assert_same_grads(grads(model, x), want)


@pytest.mark.parametrize("mode", ["none", "gumbel", "gaussian", "jitter", "simple"])
def test_non_reentrant_checkpoint_needs_no_replay_and_a_replay_is_exact_or_refused(mode):
    """The non-reentrant checkpoint's default preserve_rng_state=True redraws the noise: the step's gradients
    without a replay. A replayed recomputation is either exact (where its graph is the recorded one's) or
    refused loudly (torch's CheckpointError where it differs), never used silently."""
    model, x, probe, want = step_without_checkpointing(mode)
    torch.manual_seed(3)
    y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    torch.manual_seed(4)
    (y * probe).sum().backward()
    assert_same_grads(grads(model, x), want)
    x.grad = None
    replay = RouterReplay(model)
    torch.manual_seed(3)
    with replay.record():
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    try:
        with replay.replay():
            (y * probe).sum().backward()
    except torch.utils.checkpoint.CheckpointError:
        pass  # refused loudly: the replayed graph differs from the recorded one
    else:
        assert_same_grads(grads(model, x), want)


class Flaky(LinearMixture):
    """Expert 3 runs out of memory while ``fail`` is set (after the routing was recorded)."""
    fail = False

    def expert_forward(self, expert, x):
        if self.fail and expert.expert_id == 3:
            raise torch.OutOfMemoryError("expert 3 out of memory")
        return expert(x)


def test_record_and_replay_drop_a_forward_that_raised():
    torch.manual_seed(0)
    model = nn.Sequential(LinearMixture(6, 6, 4, k=2, noise="gumbel"), Flaky(6, 6, 4, k=2, noise="gumbel")).train()
    x = torch.randn(32, 6)
    replay = RouterReplay(model)
    with replay.record():
        model[1].fail = True  # block 0 returned, block 1 routed, then an expert raised: the model forward raised
        with pytest.raises(torch.OutOfMemoryError):
            model(x)
        model[1].fail = False
        want = model(x)  # the retry
        hidden = torch.tanh(x)
        model[1].fail = True  # a block called on its own
        with pytest.raises(torch.OutOfMemoryError):
            model[1](hidden)
        model[1].fail = False
        want_1 = model[1](hidden)
    assert [len(calls) for calls in replay.records.values()] == [1, 2]
    with replay.replay():
        model[1].fail = True  # a replayed forward that raised hands its calls to the retry
        with pytest.raises(torch.OutOfMemoryError):
            model(x)
        model[1].fail = False
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(model[1](hidden), want_1)


def test_leaving_replay_with_calls_unused_is_an_error_that_never_masks_another():
    model, x1, x2, replay = two_recorded_calls()
    with pytest.raises(RuntimeError, match=r"unused: block '0' \(layer \? / LinearMixture \(3 experts\)\) used 1 of "
                                           r"its 2 recorded call\(s\); block '1' .* used 1 of its 2"):
        with replay.replay():
            model(x1)
    with pytest.raises(KeyError, match="the user's"):  # an exception leaving replay() propagates unchanged
        with replay.replay():
            model(x1)
            raise KeyError("the user's")
    with pytest.raises(RuntimeError, match=r"block '0' \(layer \? / LinearMixture .*\) recorded 2 call\(s\) and "
                                           r"this is call 3"):
        with replay.replay():
            model(x1)
            model(x2)
            model(x1)
    with replay.replay():  # every call used: leaves quietly
        model(x1)
        model(x2)
    for m in model:
        assert m.router_replay is None and not m._forward_hooks and not m._forward_pre_hooks


def test_the_routing_package_imports_nothing_from_the_block():
    """No import cycle block → routing/route → routing/replay → block: replay finds blocks by their Router."""
    import ast
    from pathlib import Path

    import moefy.routing

    for path in Path(moefy.routing.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [("." * node.level) + (node.module or "") + ":" + ",".join(a.name for a in node.names)]
                     if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("moefy.block", "..block", "..:block")), (path.name, name)


def test_replay_refuses_noise_from_another_device_type_and_a_bad_sample():
    import dataclasses

    from moefy.routing.simple import simple_subset

    b = block(k=2, noise="gumbel").train()
    x = torch.randn(5, 4)
    replay = RouterReplay(b)
    with replay.record():
        b(x)
    call = replay.records["."][0]
    assert call.rng_device == "cpu" and call.rng_state is not None
    replay.records["."][0] = dataclasses.replace(call, rng_device="cuda")
    with pytest.raises(ValueError, match="noise was recorded on a cuda device and this forward routes on cpu"), \
            replay.replay():
        b(x)
    with pytest.raises(ValueError, match=r"sample must be a bool tensor of the logits' shape \(5, 4\)"):
        simple_subset(torch.randn(5, 4), 2, sample=torch.ones(5, 4))
