"""Token-choice capacity (``token_capacity_factor``, ``drop_policy``): hand examples, invariants, gradients."""
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LinearMixture
from moefy import RoutingConfig
from moefy.observe.recorder import RoutingRecorder
from moefy.routing.losses import importance, switch_loss
from moefy.routing.select import cap_columns, expert_capacity, token_choice

# T=6 tokens, E=2: expert 0 is every token's first choice but token 1's; C = ceil(0.6 · 6 · 1 / 2) = 2
P6 = torch.tensor([[.9, .1], [.2, .8], [.7, .3], [.6, .4], [.95, .05], [.8, .2]], dtype=torch.float64)


def identity_gate(block):
    """The router's logits are the input itself: x = log p gives scores p."""
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.eye(block.router.gate.weight.shape[0]))
    return block


def test_capacity_convention_counts_real_experts_only():
    assert expert_capacity(6, 2, 1, 0.6) == 2                   # ceil(1.8)
    assert expert_capacity(6, 2, 2, 0.6) == 4                   # ceil(3.6)
    assert expert_capacity(6, 2, 2, 5.0) == 6                   # capped at T
    # with a hole the E in C = ceil(f·T·k/E) is still 2 (the hole is not an expert and is never capped)
    probs = torch.cat([P6 * 0.5, torch.full((6, 1), 0.5, dtype=torch.float64)], 1)  # (6, 3)
    probs[:, 2] = torch.tensor([.1, .1, .1, .1, .9, .9], dtype=torch.float64)  # tokens 4, 5 to the hole
    s = token_choice(probs, RoutingConfig(hole=True, token_capacity_factor=0.6), 2)
    assert s.count.tolist() == [2, 1, 2] and int(s.dropped) == 2 + 1  # hole 2, expert 0: 3 tokens, keeps 2
    assert s.token_index.tolist() == [0, 2, 1, 4, 5]          # probs: tokens 0 (.45), 2 (.35) beat 3 (.3)


@pytest.mark.parametrize("policy,kept0", [("probs", [0, 4]), ("position", [0, 2])])
def test_hand_example_k1(policy, kept0):
    block = identity_gate(LinearMixture(2, 3, 2, token_capacity_factor=0.6, drop_policy=policy).double())
    x = P6.log()                                               # (6, 2)
    with RoutingRecorder(block) as rec:
        y = block(x)
    r = block.routing
    assert r.token_index.tolist() == kept0 + [1] and r.expert_index.tolist() == [0, 0, 1]
    assert r.counts == (2, 1) and int(r.dropped) == 3 and r.num_assigned == 3
    assert int(r.load.sum()) + int(r.dropped) == 6 * 1
    assert r.indices.reshape(-1).tolist() == [0, 1, 0, 0, 0, 0]      # the picks as made
    assert r.picked_count.tolist() == [5, 1]
    dropped = sorted({0, 2, 3, 4, 5} - set(kept0))
    assert torch.equal(y[dropped], torch.zeros(3, 3, dtype=torch.float64))  # only slot dropped: zero output
    for t, e in zip(kept0 + [1], [0, 0, 1]):                   # k=1: weight exactly 1
        torch.testing.assert_close(y[t], block.experts[e](x[t]))
    assert block.experts_load().reshape(-1).tolist() == [2, 1]
    stats = rec.stats[""]
    assert stats.dropped == 3 and stats.load.tolist() == [2.0, 1.0] and stats.dropped_frac == 0.5


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_hand_example_k2_weights_are_not_renormalised(policy):
    p = torch.tensor([[.9, .1], [.6, .4], [.3, .7], [.2, .8]], dtype=torch.float64)
    block = identity_gate(LinearMixture(2, 3, 2, k=2, token_capacity_factor=0.5, drop_policy=policy).double())
    x = p.log()
    y = block(x)                                              # C = ceil(0.5 · 4 · 2 / 2) = 2 per expert
    f = [block.experts[e](x) for e in range(2)]               # (4, 3) each
    if policy == "probs":  # expert 0 keeps tokens 0, 1 (.9, .6); expert 1 keeps 2, 3 (.7, .8)
        want = torch.stack([.9 * f[0][0], .6 * f[0][1], .7 * f[1][2], .8 * f[1][3]])
        assert block.routing.token_index.tolist() == [0, 1, 2, 3]
    else:  # both experts keep tokens 0, 1
        want = torch.stack([.9 * f[0][0] + .1 * f[1][0], .6 * f[0][1] + .4 * f[1][1],
                            torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)])
        assert block.routing.token_index.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(y, want)
    assert block.routing.counts == (2, 2) and int(block.routing.dropped) == 4


def test_probs_ties_keep_earlier_tokens():
    probs = torch.full((4, 2), 0.5).index_fill(1, torch.tensor([1]), 0.4)  # every token: expert 0, same score
    s = token_choice(probs, RoutingConfig(token_capacity_factor=0.5), 2)      # C = 1
    assert s.token_index.tolist() == [0] and int(s.dropped) == 3


@st.composite
def capped(draw):
    num_experts = draw(st.integers(1, 5))
    hole = draw(st.booleans())
    k = draw(st.integers(1, num_experts + int(hole)))
    return dict(num_experts=num_experts, hole=hole, k=k, token_capacity_factor=draw(st.floats(0.05, 3.0)),
                drop_policy=draw(st.sampled_from(["probs", "position"])), normalize=draw(st.booleans()),
                noise=draw(st.sampled_from([None, "gumbel", "simple"]))), \
        draw(st.integers(0, 12)), draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capped())
def test_capacity_invariants(case):
    options, num_tokens, training, seed = case
    torch.manual_seed(seed)
    block = LinearMixture(4, 3, **options).train(training)
    x = torch.randn(num_tokens, 4)
    torch.manual_seed(seed + 1)  # the same training noise for both blocks
    y = block(x)
    r = block.routing
    e, k = options["num_experts"], options["k"]
    c = expert_capacity(num_tokens, e, k, options["token_capacity_factor"])
    assert c == min(math.ceil(options["token_capacity_factor"] * num_tokens * k / e), num_tokens)
    # every slot is processed or dropped, exactly
    assert int(r.load.sum()) + int(r.dropped) == num_tokens * k
    assert r.token_index.numel() == sum(r.counts) and r.num_assigned == int(r.load.sum())
    assert all(n <= c for n in r.counts[:e]) and torch.isfinite(y).all()
    assert torch.equal(r.count, torch.tensor(r.counts))
    # against the same block without capacity: the hole and the under-full experts are untouched
    free = LinearMixture(4, 3, **{**options, "token_capacity_factor": None}).train(training)
    free.load_state_dict(block.state_dict())
    torch.manual_seed(seed + 1)
    free(x)
    f = free.routing
    assert torch.equal(r.indices, f.indices) and torch.equal(r.picked_count, f.count)
    assert r.counts == tuple(min(n, c) if i < e else n for i, n in enumerate(f.counts))
    kept = set(zip(r.token_index.tolist(), r.expert_index.tolist()))
    picks = list(zip(f.token_index.tolist(), f.expert_index.tolist()))
    assert kept <= set(picks)
    for col in range(e):  # the policy: no dropped assignment beats a kept one of its column
        mine = [t for t, j in kept if j == col]
        lost = [t for t, j in picks if j == col and (t, j) not in kept]
        assert r.token_index[r.expert_index == col].tolist() == sorted(mine)   # token order in a column
        if mine and lost:
            if options["drop_policy"] == "position":
                assert max(mine) < min(lost)
            else:
                assert min(r.probs[mine, col]) >= max(r.probs[lost, col])
    # pre-drop aux losses
    torch.testing.assert_close(switch_loss(r), switch_loss(f))
    torch.testing.assert_close(importance(r), importance(f))


@pytest.mark.parametrize("k,hole", [(1, False), (2, False), (2, True)])
def test_large_factor_is_dropless(k, hole):
    torch.manual_seed(0)
    free = LinearMixture(4, 3, 4, k=k, hole=hole)
    x = torch.randn(2, 9, 4)
    want = free(x)
    most = max(free.routing.counts[:4])
    for factor in (most * 4 / (18 * k) + 1e-9, 4.0):            # C = the fullest expert's load; C >= T
        block = LinearMixture(4, 3, 4, k=k, hole=hole, token_capacity_factor=factor)
        block.load_state_dict(free.state_dict())
        y = block(x)
        assert torch.equal(y, want) and int(block.routing.dropped) == int(free.routing.dropped)
        assert block.routing.counts == free.routing.counts
        assert torch.equal(block.routing.token_index, free.routing.token_index)


def test_gradcheck_through_a_capped_block():
    torch.manual_seed(0)
    block = LinearMixture(3, 2, 3, k=2, token_capacity_factor=0.5, drop_policy="probs", normalize=True).double()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    w = block.router.gate.weight.detach().clone().requires_grad_(True)

    def run(x, w):
        return torch.func.functional_call(block, {"router.gate.weight": w}, (x,))

    run(x, w)
    assert int(block.routing.dropped) > 0                      # the check covers dropped slots
    assert torch.autograd.gradcheck(run, (x, w))


def test_cap_columns_is_the_identity_when_nothing_overflows():
    probs = torch.softmax(torch.randn(5, 3), -1)
    s = token_choice(probs, RoutingConfig(k=2), 3)
    assert cap_columns(s, probs, 5, 3) is s


def test_bad_capacity_options():
    with pytest.raises(ValueError, match=r"token_capacity_factor caps token choice"):
        RoutingConfig(expert_choice=True, token_capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"token_capacity_factor must be a finite number > 0"):
        LinearMixture(4, 3, 2, token_capacity_factor=0.0)
    with pytest.raises(ValueError, match=r"drop_policy must be one of \('probs', 'position'\)"):
        LinearMixture(4, 3, 2, token_capacity_factor=1.0, drop_policy="random")


def test_expert_choice_defaults_unchanged():
    c = RoutingConfig(expert_choice=True)
    assert c.capacity_factor == 1.0 and c.capacity is None and c.token_capacity_factor is None
    assert "capacity=1.0x" in c.summary(2)
    assert "capacity=0.5x, drop_policy=position" in RoutingConfig(token_capacity_factor=0.5,
                                                                  drop_policy="position").summary(2)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_and_looped_agree_with_capacity(fused):
    torch.manual_seed(0)
    ref = LinearMixture(4, 3, 3, k=2, hole=True, token_capacity_factor=0.4)
    block = LinearMixture(4, 3, 3, k=2, hole=True, token_capacity_factor=0.4, fused=fused)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(10, 4, requires_grad=True)
    y = block(x)
    assert int(block.routing.dropped) > int(block.routing.counts[3])   # some slots over capacity
    torch.testing.assert_close(y, ref(x))
    y.sum().backward()
    assert all(p.grad is not None for p in block.experts.parameters())


def test_load_plots_name_the_slots_over_capacity():
    pytest.importorskip("matplotlib")
    from moefy.viz import plot_experts_load, plot_total_load
    block = identity_gate(LinearMixture(2, 3, 2, token_capacity_factor=0.6).double())
    block(P6.log())
    assert plot_total_load(block).axes[0].get_title().endswith("(3 slots over capacity, dropped)")
    assert "(3 slots over capacity, dropped)" in plot_experts_load(block)._suptitle.get_text()
    free = identity_gate(LinearMixture(2, 3, 2).double())
    free(P6.log())
    assert "over capacity" not in plot_total_load(free).axes[0].get_title()


def test_compiled_capped_block_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = LinearMixture(4, 3, 4, k=2, token_capacity_factor=0.5, drop_policy="position")
    x = torch.randn(3, 5, 4)
    want = block(x)
    dropped = int(block.routing.dropped)
    got = torch.compile(block, backend="aot_eager")(x)
    assert dropped > 0 and int(block.routing.dropped) == dropped
    torch.testing.assert_close(got, want)


def _ep_worker(rank, world, port, out_dir):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from moefy.parallel import expert_parallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        block = expert_parallel(_ep_block(), group=dist.new_group())
        x = _ep_batch()[rank].clone().requires_grad_()
        y = block(x)
        (y.sum() + block.aux_loss).backward()                   # the exchange's backward runs too
        torch.save(dict(y=y.detach(), counts=block.routing.counts,
                        dropped=int(block.routing.dropped), aux=block.aux_loss.detach()),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ep_block():
    torch.manual_seed(0)
    return LinearMixture(4, 3, 4, k=2, hole=True, token_capacity_factor=0.5, aux_criterion="switch").double()


def _ep_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 9, 4, generator=g, dtype=torch.float64)   # rank r's 9 tokens: batch[r]


def test_expert_parallel_caps_each_ranks_tokens(tmp_path):
    """Each rank caps its own T_r tokens (as Megatron-LM, before the exchange): its output is the one-process
    block's on that rank's tokens; the global switch loss sees every rank's picks before drops."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ep_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2 ranks did not finish in 120 s (a hung collective?)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    block, batch = _ep_block(), _ep_batch()
    for r, got in enumerate(ranks):
        y = block(batch[r])
        torch.testing.assert_close(got["y"], y.detach())
        assert got["counts"] == block.routing.counts and got["dropped"] == int(block.routing.dropped) > 0
    block(batch.reshape(18, 4))                                # the group's routing, for its aux loss only
    free = LinearMixture(4, 3, 4, k=2, hole=True, aux_criterion="switch").double()
    free.load_state_dict(block.state_dict())
    free(batch.reshape(18, 4))
    for got in ranks:
        torch.testing.assert_close(got["aux"], free.aux_loss.detach())
