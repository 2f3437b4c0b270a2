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
    with replay.replay(), pytest.raises(ValueError, match=r"shape \(7, 1\).*T=10"):
        b(x)  # no mask: 10 routed tokens, the record has 7


def test_replay_shape_mismatch_names_the_argument():
    b = block(k=2)
    replay = RouterReplay(b)
    with replay.record():
        b(torch.randn(5, 4))
    with replay.replay(), pytest.raises(ValueError, match=r"indices .*T=6"):
        b(torch.randn(6, 4))
    call = replay.records["."][0]
    replay.records["."][0] = Replayed(call.indices[:, :1], call.weights[:, :1])
    with replay.replay(), pytest.raises(ValueError, match=r"k=1 .*k=2"):
        b(torch.randn(5, 4))


def test_replay_every_block_in_call_order_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(LinearMixture(4, 4, 3, k=1, noise="gumbel"), LinearMixture(4, 4, 3, k=2, noise="gumbel"))
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    replay = RouterReplay(model)
    with replay.record():
        model(x1)
        model(x2)
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
