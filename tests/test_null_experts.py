"""MoE++'s null experts (zero / copy / constant, Jin et al. 2024): hand-computed outputs, a brute-force
reference over every option that touches them, gradcheck, counts, errors, recorder and plots."""
import math

import pytest
import torch
from torch import nn

from conftest import LinearMixture
from moefy import RoutingConfig
from moefy.observe.recorder import RoutingRecorder
from moefy.routing.losses import AUX_LOSSES
from moefy.viz import plot_experts_load, plot_load_heatmap, plot_total_load

NULL = {"zero": 1, "copy": 1, "constant": 1}


def hand_block(**options):
    """1 real expert + copy + constant + zero over D=2, weights set by hand: columns 0 expert, 1 copy,
    2 constant, 3 zero. Token (1,0) prefers column 0, (0,1) column 1, (-1,0) column 2, (0,-1) column 3."""
    block = LinearMixture(2, 2, 1, null_experts=NULL, **options).double()
    with torch.no_grad():
        block.router.gate.weight.copy_(2 * torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
        block.experts[0].weight.copy_(torch.tensor([[1.0, 2], [3, 4]]))
        block.experts[0].bias.copy_(torch.tensor([0.5, -0.5]))
        block.constant_experts.constant.copy_(torch.tensor([[10.0, 20]]))
        block.constant_experts.gate.copy_(torch.tensor([[[1.0, 0], [0, 1]]]))
    return block


X = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float64)


def test_hand_computed_outputs_and_counts():
    block = hand_block(k=1, normalize=False)
    y = block(X)
    r = block.routing
    assert r.indices.reshape(-1).tolist() == [0, 1, 2, 3]
    p = math.exp(2) / (math.exp(2) + 1 + 1 + math.exp(-2))  # each token's top score: logits (2, 0, -2, 0) permuted
    a1, a2 = [math.exp(-1) / (math.exp(-1) + 1), 1 / (math.exp(-1) + 1)]  # softmax(W_c x) for x = (-1, 0)
    want = torch.tensor([[p * 1.5, p * 2.5],                      # p · (A x + b), x = (1, 0)
                         [0, p],                                  # copy: p · x
                         [p * (-a1 + a2 * 10), p * a2 * 20],     # constant: p · (α1 x + α2 v)
                         [0, 0]], dtype=torch.float64)            # zero
    torch.testing.assert_close(y, want)
    assert r.null_columns == ("copy", "constant", "zero")
    assert list(r.load) == [1] and r.null_counts == (1, 1, 1) and r.null_slots == 2 and int(r.dropped) == 1
    assert sum(r.load) + r.null_slots + int(r.dropped) == 4 * 1
    assert block.num_columns == 4 and block.moe_name.endswith("(1 experts + 3 null experts)")


def test_hole_stays_the_last_column_and_one_more_zero():
    block = LinearMixture(4, 4, 2, k=2, hole=True, null_experts={"zero": 2, "copy": 1})
    assert block.num_columns == 2 + 3 + 1 and block.config.zero_columns == 3
    block(torch.randn(50, 4))
    r = block.routing
    counts = r.counts
    assert int(r.dropped) == sum(counts[3:]) and r.null_slots == counts[2] and r.null_counts == counts[2:5]
    assert sum(r.load) + r.null_slots + int(r.dropped) == 50 * 2


def reference(block, x, token_mask=None):
    """Dense brute force: every column's output for every token, the record's picks and weights summed."""
    r = block.routing
    e = block.num_experts
    kinds = block.config.null_columns
    rows = x.reshape(-1, x.shape[-1])
    outs = [block.experts[i](rows) for i in range(e)]
    const = iter(range(len(kinds)))
    for kind in kinds:
        if kind == "copy":
            outs.append(rows)
        elif kind == "constant":
            j = next(c for c in const if kinds[c] == "constant") - kinds.index("constant")
            alpha = (rows @ block.constant_experts.gate[j].t()).softmax(-1)
            outs.append(alpha[:, :1] * rows + alpha[:, 1:] * block.constant_experts.constant[j])
        else:
            outs.append(torch.zeros_like(rows))
    if block.hole:
        outs.append(torch.zeros_like(rows))
    dense = torch.stack(outs, 1)                                                         # (T, E', D)
    kept = r.kept if r.kept is not None else torch.arange(rows.shape[0])
    y = torch.zeros_like(rows)
    picked = dense[kept].gather(1, r.indices[..., None].expand(-1, -1, rows.shape[1]))  # (T_kept, k, D)
    y[kept] = (picked * r.weights[..., None].to(rows.dtype)).sum(1)
    return y.reshape(x.shape)


@pytest.mark.parametrize("k,normalize,hole,fused,masked", [
    (1, True, False, False, False), (2, True, False, False, False), (3, False, True, False, False),
    (2, True, True, True, False), (2, False, False, True, True), (4, True, True, False, True)])
def test_matches_a_dense_reference(k, normalize, hole, fused, masked):
    block = LinearMixture(4, 4, 3, k=k, normalize=normalize, hole=hole, fused=fused,
                          null_experts={"zero": 1, "copy": 2, "constant": 2}).double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    mask = torch.rand(3, 7) > 0.3 if masked else None
    y = block(x, token_mask=mask)
    r = block.routing
    assert r.null_slots > 0 and r.null_counts[-1] + int(hole) * r.counts[-1] == int(r.dropped)
    torch.testing.assert_close(y, reference(block, x, mask))
    assert sum(r.load) + r.null_slots + int(r.dropped) == r.num_tokens * k
    if masked:
        assert torch.all(y[~mask] == 0)


def test_fused_equals_unfused():
    torch.manual_seed(1)
    loose = LinearMixture(4, 4, 3, k=2, null_experts={"copy": 1, "constant": 1, "zero": 1})
    fused = LinearMixture(4, 4, 3, k=2, null_experts={"copy": 1, "constant": 1, "zero": 1}, fused=True)
    fused.load_state_dict(loose.state_dict())
    x = torch.randn(40, 4)
    torch.testing.assert_close(fused(x), loose(x))


def test_gradcheck_through_copy_and_constant_paths():
    block = LinearMixture(3, 3, 2, k=2, null_experts={"copy": 1, "constant": 2, "zero": 1}).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    block(x)
    assert block.routing.null_counts[0] > 0 and block.routing.null_counts[1] + block.routing.null_counts[2] > 0
    names = ["constant_experts.constant", "constant_experts.gate", "router.gate.weight"]
    params = [dict(block.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(), *params), eps=1e-6, atol=1e-5)
    f(x, *params).sum().backward()
    assert params[0].grad.abs().sum() > 0 and params[1].grad.abs().sum() > 0


def test_unused_constant_experts_get_zero_gradients_not_none():
    block = hand_block(k=1)
    block(X[:2]).sum().backward()  # no token picks the constant column
    assert block.routing.null_counts == (1, 0, 0)
    assert torch.all(block.constant_experts.constant.grad == 0) and torch.all(block.constant_experts.gate.grad == 0)


def test_copy_routes_whole_samples():
    torch.manual_seed(2)
    block = LinearMixture(4, 4, 2, route="samples", k=2, null_experts={"copy": 1, "zero": 1}).double()
    x = torch.randn(16, 5, 4, dtype=torch.float64)
    y = block(x)
    r = block.routing
    dense = torch.stack([block.experts[0](x), block.experts[1](x), x, torch.zeros_like(x)], 1)  # (B, E', N, D)
    want = (dense.gather(1, r.indices[:, :, None, None].expand(-1, -1, 5, 4)) * r.weights[:, :, None, None]).sum(1)
    torch.testing.assert_close(y, want)
    assert r.null_slots == r.counts[2] > 0


def test_aux_losses_balance_over_the_null_columns_too():
    block = LinearMixture(4, 4, 2, k=2, null_experts={"copy": 1, "constant": 1, "zero": 1},
                          aux_criterion=["switch", "balance"])
    block(torch.randn(30, 4))
    r = block.routing
    assert r.probs.shape == (30, 5)
    frac = r.picked_count.double() / 60
    want = 5 * (frac * r.probs.double().mean(0)).sum()
    torch.testing.assert_close(block.aux_losses["switch"].double(), want)
    assert AUX_LOSSES["balance"](r).shape == ()


def test_bad_values_and_shapes_are_refused():
    with pytest.raises(ValueError, match=r"null_experts 'copy' / 'constant' .* input's shape \(4,\)"):
        LinearMixture(4, 3, 2, null_experts={"copy": 1})(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"null_experts 'constant' .* route='tokens'"):
        LinearMixture(4, 4, 2, null_experts={"constant": 1}, route="samples")
    with pytest.raises(ValueError, match=r"null_experts .*\(expert_choice=False\)"):
        RoutingConfig(null_experts={"zero": 1}, expert_choice=True)
    with pytest.raises(ValueError, match=r"null_experts .*\(n_group=1\)"):
        RoutingConfig(null_experts={"zero": 1}, n_group=2)
    with pytest.raises(ValueError, match=r"k must be a number in \[1, 4\] \(the number of experts \+ null experts "
                                         r"\+ hole\), got 5"):
        LinearMixture(4, 4, 2, k=5, hole=True, null_experts={"zero": 1})
    LinearMixture(4, 3, 2, null_experts={"zero": 2})(torch.randn(5, 4))  # zero experts need no shape


def test_config_normalises_and_zero_counts_vanish():
    c = RoutingConfig(null_experts={"zero": 2, "copy": 0, "constant": 1})
    assert c.null_experts == {"constant": 1, "zero": 2} and c.null_columns == ("constant", "zero", "zero")
    assert RoutingConfig(null_experts={"copy": 0}).null_experts is None
    assert RoutingConfig(null_experts={}) == RoutingConfig()
    assert hash(c) == hash(RoutingConfig(null_experts={"constant": 1, "zero": 2}))
    assert "null_experts={'constant': 1, 'zero': 2}" in c.summary(3)


def test_recorder_and_plots_name_the_null_columns():
    block = LinearMixture(4, 4, 2, k=2, hole=True, null_experts={"zero": 2, "copy": 1, "constant": 1})
    names = ["expert 0", "expert 1", "copy 0", "const 0", "zero 0", "zero 1", "hole"]
    with RoutingRecorder(block) as rec:
        block(torch.randn(2, 10, 4))
        block(torch.randn(2, 10, 4))
    s = rec.stats[""]
    assert s.null_columns == ("copy", "constant", "zero", "zero") and s.num_columns == 7
    assert s.load.shape == (7,) and s.load.sum() == 80 - (s.dropped - sum(s.load[4:].tolist()))
    assert s.null_slots == int(s.load[2] + s.load[3])
    fig = plot_total_load(block)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names
    assert [p.get_height() for p in fig.axes[0].patches] == list(block.routing.counts)
    fig = plot_experts_load(block, s.position_load)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == names
    fig = plot_load_heatmap(rec)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "copy", "const", "zero", "hole"]
    grid = fig.axes[0].images[0].get_array()
    frac = s.load / s.load.sum()
    torch.testing.assert_close(torch.tensor(grid.data[0]), torch.cat([frac[:4], frac[4:6].sum(0, True), frac[6:]]))


def test_training_log_names_the_null_columns(tmp_path):
    from moefy.observe.log import LogFormatError, TrainingLogWriter, read_log
    from moefy.viz import dashboard
    block = LinearMixture(4, 4, 2, k=2, hole=True, null_experts={"copy": 1, "zero": 1})
    with RoutingRecorder(block) as rec:
        block(torch.randn(20, 4))
    path = tmp_path / "log.jsonl"
    layer = rec.summary()[0]
    assert layer["null_columns"] == ["copy", "zero"] and len(layer["utilization"]) == 5
    with TrainingLogWriter(path) as writer:
        writer.write(1, rec)
    log = read_log(path)
    series = next(iter(log.layers.values()))
    assert series.null_columns == ["copy", "zero"]
    assert dashboard._columns(series) == ["expert 0", "expert 1", "copy 0", "zero 0", "hole"]
    fig = dashboard.plot_utilization(log)
    assert [l.get_label() for l in fig.axes[0].get_lines()][:5] == ["expert 0", "expert 1", "copy 0", "zero 0", "hole"]
    path.write_text('{"epoch": 1, "routing_acc": null, "entropy": 1, "utilization": [1, 0], '
                    '"null_columns": ["one"]}\n')
    with pytest.raises(LogFormatError, match=r"'null_columns' must be a list of kinds in \['copy', 'constant', "
                                             r"'zero'\]"):
        read_log(path)


def test_replay_reproduces_null_routing():
    from moefy.routing import RouterReplay
    block = LinearMixture(4, 4, 2, k=2, noise="gumbel", null_experts={"copy": 1, "constant": 1, "zero": 1})
    x = torch.randn(30, 4)
    replay = RouterReplay(block)
    with replay.record():
        y = block(x)
    counts, dropped, null = block.routing.counts, int(block.routing.dropped), block.routing.null_slots
    with replay.replay(weights="frozen"):  # the recorded weights: the noisy forward's output again
        y2 = block(x)
    assert block.routing.counts == counts and int(block.routing.dropped) == dropped
    assert block.routing.null_slots == null
    torch.testing.assert_close(y2, y)


def test_patch_panels_put_null_columns_with_the_dropped():
    from moefy.viz.patches import patch_masks
    block = hand_block(k=1)
    block(torch.stack([X, X]).reshape(1, 8, 2).float().double())  # 8 tokens = a 2x4 patch grid
    masks, _, _ = patch_masks(block.routing, (2, 4), prefix_tokens=0)
    assert masks.shape == (2, 2, 4)  # expert 0, then one "null / dropped" panel
    assert masks[0].reshape(-1).tolist() == [True, False, False, False] * 2
    assert masks[1].reshape(-1).tolist() == [False, True, True, True] * 2
