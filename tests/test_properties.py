"""Property tests over the routing space: shapes, finiteness, conservation of tokens, aux-loss signs."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefy.routing.losses import AUX_LOSSES
from conftest import LinearMixture

NONNEGATIVE = {"entropy", "prob", "cv2", "switch", "z", "balance", "seq_balance", "global_switch"}


@st.composite
def configs(draw):
    num_experts = draw(st.integers(1, 6))
    hole = draw(st.booleans())
    expert_choice = draw(st.booleans())
    columns = num_experts + int(hole)
    noise = draw(st.sampled_from([None, "gumbel", "gaussian", "jitter"]))
    aux = draw(st.lists(st.sampled_from(sorted(AUX_LOSSES)), unique=True, max_size=3))
    if "prob" in aux and (noise != "gaussian" or expert_choice):
        aux.remove("prob")
    if "seq_balance" in aux and expert_choice:
        aux.remove("seq_balance")
    options = dict(num_experts=num_experts, hole=hole, expert_choice=expert_choice, noise=noise,
                   aux_criterion=aux, aggregation=draw(st.sampled_from(["sum", "mean"])),
                   normalize=draw(st.booleans()))
    if expert_choice:
        options["k"] = draw(st.integers(1, columns))
        options["capacity_factor"] = draw(st.floats(0.1, 3.0))
    else:
        options["k"] = draw(st.integers(1, columns))
    shape = draw(st.sampled_from([(0,), (1,), (7,), (2, 5), (3, 1), (2, 0), (2, 3, 4)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return options, shape, dtype, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_routing_invariants(config):
    options, shape, dtype, training, seed = config
    torch.manual_seed(seed)
    block = LinearMixture(5, 3, **options).to(dtype).train(training)
    x = torch.randn(*shape, 5, dtype=dtype)
    y = block(x)
    r = block.routing
    num_tokens = x.numel() // 5
    assert y.shape == (*shape, 3) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert r.num_tokens == num_tokens and len(r.counts) == block.num_columns
    assert r.token_index.numel() == sum(r.counts)
    if not options["expert_choice"]:
        # every token slot is processed by a real expert or counted as dropped
        assert r.num_assigned + int(r.dropped) == num_tokens * options["k"]
        assert torch.equal(torch.bincount(r.token_index, minlength=num_tokens),
                           torch.full((num_tokens,), options["k"]))
    else:
        covered = set(r.token_index[: r.num_assigned].tolist())
        assert int(r.dropped) == num_tokens - len(covered)
        if num_tokens:
            assert all(c == r.counts[0] for c in r.counts) and r.counts[0] <= num_tokens
    if options["hole"] and not options["expert_choice"]:
        only_hole = (r.indices == block.num_experts).all(-1)
        assert torch.all(y.reshape(-1, 3)[only_hole] == 0)
        assert int(r.dropped) == int((r.indices == block.num_experts).sum())
    for name, value in block.aux_losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        if name in NONNEGATIVE:
            assert float(value.detach()) >= -1e-6, name
    assert torch.isfinite(block.aux_loss)
    if training and num_tokens and y.requires_grad:
        (y.float().sum() + block.aux_loss).backward()
        for p in block.experts.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def masked_are_zero_and_every_parameter_learns(block, y, mask, backward: bool) -> None:
    if mask is not None:
        assert torch.all(y[~mask] == 0)
    if backward and y.requires_grad:
        (y.sum() + block.aux_loss).backward()
        for p in block.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


@st.composite
def null_configs(draw):
    """Token choice with MoE++ null experts (D → D experts so copy and constant apply)."""
    num_experts = draw(st.integers(1, 4))
    null = {kind: draw(st.integers(0, 2)) for kind in ("zero", "copy", "constant")}
    hole = draw(st.booleans())
    columns = num_experts + sum(null.values()) + int(hole)
    options = dict(num_experts=num_experts, hole=hole, null_experts=null, k=draw(st.integers(1, columns)),
                   normalize=draw(st.booleans()), noise=draw(st.sampled_from([None, "gumbel", "simple"])),
                   token_capacity_factor=draw(st.sampled_from([None, 0.5, 1.0])),
                   aux_criterion=draw(st.lists(st.sampled_from(["switch", "balance", "z"]), unique=True, max_size=2)))
    shape = draw(st.sampled_from([(0,), (1,), (7,), (2, 5), (2, 3, 4)]))
    masked = draw(st.booleans())
    return options, shape, masked, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(null_configs())
def test_null_expert_slots_are_processed_null_or_dropped(config):
    """``sum(load) + null_slots + dropped == T·k``: every slot reaches a real expert, a copy / constant null
    expert, or is dropped (zero expert, hole, over capacity); zero / hole slots are exactly the dropped tail."""
    options, shape, masked, training, seed = config
    torch.manual_seed(seed)
    block = LinearMixture(4, 4, **options).train(training)
    x = torch.randn(*shape, 4)
    mask = torch.rand(shape) > 0.4 if masked else None
    y = block(x, token_mask=mask)
    r = block.routing
    t, k, e = r.num_tokens, options["k"], block.num_experts
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert len(r.counts) == block.num_columns == e + len(r.null_columns) + int(options["hole"])
    assert int(sum(r.load)) + r.null_slots + int(r.dropped) == t * k
    zero_tail = sum(r.counts[block.num_columns - block.config.zero_columns:])
    over = int((r.picked_count[:e] - r.count[:e]).sum())
    assert int(r.dropped) == zero_tail + over
    assert r.null_slots == sum(n for n, kind in zip(r.null_counts, r.null_columns) if kind != "zero")
    masked_are_zero_and_every_parameter_learns(block, y, mask, training and t > 0)


@st.composite
def deepseek_configs(draw):
    """Token choice with DeepSeek-V3's pieces: groups, a selection bias, scaling, shared experts, capacity."""
    groups = draw(st.sampled_from([1, 2, 3]))
    num_experts = groups * draw(st.integers(1, 3))
    topk_group = draw(st.integers(1, groups))
    k = draw(st.integers(1, topk_group * num_experts // groups))
    options = dict(num_experts=num_experts, k=k, n_group=groups, topk_group=topk_group,
                   score_func=draw(st.sampled_from(["softmax", "sigmoid"])), selection_bias=draw(st.booleans()),
                   routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), normalize=draw(st.booleans()),
                   noise=draw(st.sampled_from([None, "gumbel"])),
                   token_capacity_factor=draw(st.sampled_from([None, 0.5, 1.0])),
                   aux_criterion=draw(st.lists(st.sampled_from(["switch", "seq_balance", "z"]), unique=True,
                                               max_size=2)))
    shared = draw(st.integers(0, 2))
    gate = shared > 0 and draw(st.booleans())
    shape = draw(st.sampled_from([(0,), (1,), (7,), (2, 5), (2, 3, 4)]))
    return options, shared, gate, shape, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deepseek_configs())
def test_group_limited_routing_keeps_every_slot_counted(config):
    """``sum(load) + dropped == T·k`` with groups, bias, scaling, shared experts and capacity; every token's
    picks are distinct and lie in at most ``topk_group`` groups; normalised weights sum to the scaling factor."""
    options, shared, gate, shape, masked, training, seed = config
    torch.manual_seed(seed)
    block = LinearMixture(5, 3, shared_experts=[torch.nn.Linear(5, 3) for _ in range(shared)] or None,
                          shared_gate=gate, **options).train(training)
    if options["selection_bias"]:
        with torch.no_grad():
            block.router.score_correction_bias.normal_()
    x = torch.randn(*shape, 5)
    mask = torch.rand(shape) > 0.4 if masked else None
    y = block(x, token_mask=mask)
    r = block.routing
    t, k, e, groups = r.num_tokens, options["k"], block.num_experts, options["n_group"]
    assert y.shape == (*shape, 3) and torch.isfinite(y).all()
    assert int(sum(r.load)) + int(r.dropped) == t * k
    if t:
        picks = r.indices.sort(-1).values
        assert (picks[:, 1:] != picks[:, :-1]).all()
        per_group = e // groups
        assert all(len(set((row // per_group).tolist())) <= options["topk_group"] for row in r.indices)
        if options["normalize"]:
            torch.testing.assert_close(r.weights.sum(-1), torch.full((t,), options["routed_scaling_factor"]))
    masked_are_zero_and_every_parameter_learns(block, y, mask, training and t > 0)
