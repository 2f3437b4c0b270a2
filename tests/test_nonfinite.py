"""Non-finite router scores: a token with a NaN / ±inf score is routed nowhere, in every routing mode.

It never takes another token's place or capacity (clean outputs equal, bit for bit, those of the batch with
that token masked out), its slots count in ``dropped`` and in no column, its output is NaN, and the aux
losses and statistics are those of the finite tokens (to float rounding). NaN router weights give a record of
nothing routed, not of a collapse onto one expert.
"""
import importlib

import pytest
import torch

from conftest import LinearMixture
from moefy.observe.recorder import RoutingRecorder
from moefy import RoutingConfig
from moefy.routing import RouterReplay
from moefy.routing.losses import AUX_LOSSES, smooth_load

select_module = importlib.import_module("moefy.routing.select")  # moefy.routing.select is also the function
B, L, D, E, BAD = 2, 8, 4, 4, (0, 1)  # 16 tokens; the bad one is early (position policy) and first in its row
NAN, INF = float("nan"), float("inf")
BAD_ROWS = {"nan": [NAN] * D, "+inf": [INF] * D, "-inf": [-INF] * D,
            "one +inf": [INF] + [0.0] * (D - 1), "one -inf": [-INF] + [0.0] * (D - 1)}
AUX = ["switch", "z", "entropy", "cv2", "balance", "seq_balance"]
# capacity 0.5: C = ceil(0.5 · 16 · 2 / 4) = 4 for 16 tokens and for the 15 finite ones, and every expert overflows
CAP = dict(token_capacity_factor=0.5)
MODES = {
    "top-k": dict(k=2),
    "top-1 raw scores": dict(k=1, normalize=False),
    "capacity probs": dict(k=2, drop_policy="probs", **CAP),
    "capacity position": dict(k=2, drop_policy="position", **CAP),
    "expert choice": dict(k=2, expert_choice=True),
    "group-limited sigmoid bias": dict(k=2, n_group=2, topk_group=1, score_func="sigmoid", selection_bias=True,
                                       routed_scaling_factor=2.5, **CAP),
    "sigmoid capacity": dict(k=2, score_func="sigmoid", **CAP),
    "hole capacity": dict(k=2, hole=True, **CAP),
    "null experts capacity": dict(k=2, null_experts={"copy": 1, "constant": 1, "zero": 1}, **CAP),
    "gaussian noise, prob loss": dict(k=2, noise="gaussian", aux_criterion=["prob", "cv2"]),
    "temperature mean": dict(k=2, temperature=0.5, aggregation="mean", **CAP),
}


def make(options, seed=0):
    torch.manual_seed(seed)
    options = dict(options)
    options.setdefault("aux_criterion", [a for a in AUX if not (a == "seq_balance" and options.get("expert_choice"))])
    block = LinearMixture(D, D, E, **options).eval()
    if block.router.score_correction_bias is not None:
        block.router.score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(B, L, D)
    return block, x


def with_bad(x, row):
    bad = x.clone()
    bad[BAD] = torch.tensor(row)
    return bad


def masked_out():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[BAD] = False
    return mask


def run(block, x, **kw):
    with torch.no_grad():
        y = block(x, **kw)
    return y, block.routing, {n: v.detach().clone() for n, v in block.aux_losses.items()}


@pytest.mark.parametrize("value", list(BAD_ROWS))
@pytest.mark.parametrize("mode", list(MODES))
def test_a_nonfinite_token_changes_no_other_token(mode, value):
    block, x = make(MODES[mode])
    y, r, aux = run(block, with_bad(x, BAD_ROWS[value]))
    y_ref, r_ref, aux_ref = run(block, x, token_mask=masked_out())        # the same batch without that token
    clean = masked_out()
    assert torch.equal(y[clean], y_ref[clean])                            # no clean token moved, bit for bit
    assert y[BAD].isnan().all()                                           # the NaN stays visible
    assert r.counts == r_ref.counts                                       # it took no place in any column
    assert torch.equal(r.picked_count, r_ref.picked_count)
    k = 1 if r.mode == "expert_choice" else block.k
    assert int(r.dropped) == int(r_ref.dropped) + k                       # its slots: dropped, counted
    assert r.num_nonfinite == 1 and torch.equal(r.nonfinite_inputs(), ~clean.reshape(-1))
    assert (r.token_index != BAD[0] * L + BAD[1]).all() and len(r.token_index) == sum(r.counts)
    if r.mode == "token_choice":
        assert sum(r.load.tolist()) + r.null_slots + int(r.dropped) == B * L * k
    for name in aux_ref:
        torch.testing.assert_close(aux[name], aux_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_importance_and_smooth_load_are_the_finite_tokens():
    block, x = make(MODES["gaussian noise, prob loss"])
    _, r, _ = run(block, with_bad(x, BAD_ROWS["nan"]))
    _, r_ref, _ = run(block, x, token_mask=masked_out())
    torch.testing.assert_close(smooth_load(r), smooth_load(r_ref))
    torch.testing.assert_close(AUX_LOSSES["cv2"](r), AUX_LOSSES["cv2"](r_ref))


def test_without_a_finite_token_the_losses_are_an_empty_batch():
    block, x = make(dict(k=2))
    _, r, aux = run(block, torch.full((3, D), NAN))
    _, r_empty, aux_empty = run(block, torch.randn(3, D), token_mask=torch.zeros(3, dtype=torch.bool))
    assert r.counts == r_empty.counts == (0,) * E and int(r.dropped) == 3 * 2
    for name in aux:
        torch.testing.assert_close(aux[name], aux_empty[name], msg=name)


@pytest.mark.parametrize("expert_choice", [False, True])
def test_nan_router_weights_route_nothing_and_claim_no_collapse(expert_choice):
    block, x = make(dict(k=2, expert_choice=expert_choice, aux_criterion=None))
    with torch.no_grad():
        block.router.gate.weight.fill_(NAN)
    with RoutingRecorder(block) as recorder:
        y, r, _ = run(block, x)
    assert y.isnan().all()
    assert r.counts == (0,) * E and r.load.sum() == 0 and r.num_nonfinite == B * L
    assert int(r.dropped) == B * L * (1 if expert_choice else 2)
    assert block.experts_load().sum() == 0 and block.abs_experts_load().sum() == 0
    stats = recorder.stats[""]
    assert stats.load.sum() == 0 and stats.dropped_frac == 1.0


def test_a_selection_with_infinite_scores_ranks_them_last():
    # the strategies directly: an expert's top-C tokens and a capacity's kept picks never hold a NaN / inf row
    probs = torch.tensor([[0.7, 0.3], [NAN, NAN], [0.6, 0.4], [INF, 0.0], [0.9, 0.1]])
    config = RoutingConfig(expert_choice=True, capacity=2)
    s = select_module.expert_choice(probs, config, 2)
    assert s.token_index.tolist() == [4, 0, 2, 0] and s.count.tolist() == [2, 2] and int(s.dropped) == 2
    assert s.finite.tolist() == [True, False, True, False, True]
    config = RoutingConfig(k=1, token_capacity_factor=0.5)  # C = ceil(0.5 · 5 / 2) = 2: expert 0 keeps 4, 0
    s = select_module.token_choice(probs, config, 2)
    assert s.token_index.tolist() == [0, 4] and s.count.tolist() == [2, 0] and int(s.dropped) == 2 + 1
    assert s.picked_count.tolist() == [3, 0] and s.weights[[1, 3]].isnan().all()


def test_simple_sampler_in_training():
    # the sampler draws per token: compare with the bad token replaced by a finite one (same draws for the others)
    block, x = make(dict(k=2, noise="simple", aux_criterion=None))
    block.train()
    finite = x.clone()
    finite[BAD] = 0.0
    torch.manual_seed(1)
    y, r, _ = run(block, with_bad(x, BAD_ROWS["nan"]))
    torch.manual_seed(1)
    y_ref, r_ref, _ = run(block, finite)
    clean = masked_out()
    assert torch.equal(y[clean], y_ref[clean]) and y[BAD].isnan().all()
    replaced = torch.bincount(r_ref.indices[BAD[0] * L + BAD[1]], minlength=E)
    assert torch.equal(r.picked_count, r_ref.picked_count - replaced) and int(r.dropped) == 2


def test_bias_balancing_and_global_balance_count_the_finite_tokens():
    options = dict(k=2, selection_bias=True, bias_update_rate=0.01, aux_criterion="global_switch", **CAP)
    block, x = make(options)
    block.train()
    bad_x, mask = with_bad(x, BAD_ROWS["nan"]), masked_out()
    block(bad_x)
    counts, global_counts = block.bias_balance.counts.clone(), block.global_balance.counts.clone()
    block.bias_balance.counts.zero_()
    block.global_balance.reset()
    block(x, token_mask=mask)
    assert torch.equal(counts, block.bias_balance.counts) and counts.sum() == 15 * 2
    assert torch.equal(global_counts, block.global_balance.counts)


def test_replay_routes_the_nonfinite_token_nowhere_again():
    block, x = make(dict(k=2, **CAP))
    bad_x = with_bad(x, BAD_ROWS["nan"])
    y_ref, r_ref, _ = run(block, x, token_mask=masked_out())
    replay = RouterReplay(block)
    with replay.record():
        y, r, _ = run(block, bad_x)
    for weights in ("recompute", "frozen"):
        with replay.replay(weights=weights):
            y_again, r_again, _ = run(block, bad_x)
        torch.testing.assert_close(y_again, y, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(y_again[masked_out()], y_ref[masked_out()])
        assert r_again.counts == r.counts == r_ref.counts and int(r_again.dropped) == int(r_ref.dropped) + 2


@pytest.mark.parametrize("options", [dict(k=2), dict(k=2, **CAP), dict(k=2, expert_choice=True),
                                     dict(k=2, hole=True)])
def test_counts_on_a_gpu_stay_on_it_until_read(monkeypatch, options):
    # an accelerator keeps the counts on the device: the non-finite slots stay listed (under the last column,
    # outside every count) until the counts are read; dispatch reads them first for a looped execution
    monkeypatch.setattr(select_module, "host_counts", lambda count, n: None)
    block, x = make(dict(options, aux_criterion=None))
    y, r, _ = run(block, with_bad(x, BAD_ROWS["nan"]))
    monkeypatch.undo()
    y_cpu, r_cpu, _ = run(block, with_bad(x, BAD_ROWS["nan"]))
    assert torch.equal(y[masked_out()], y_cpu[masked_out()]) and y[BAD].isnan().all()
    assert r.counts == r_cpu.counts and torch.equal(r.token_index, r_cpu.token_index)


def test_the_grouped_path_runs_the_listed_tail_without_reading_counts(monkeypatch):
    # the fused grouped-mm path (CUDA, bf16) finds each expert's rows on the device; here on CPU, float32
    import moefy.dispatch.fused as fused
    monkeypatch.setattr(fused, "_auto_groups", lambda x: True)
    monkeypatch.setattr(select_module, "host_counts", lambda count, n: None)
    torch.manual_seed(0)
    block = LinearMixture(4, 4, E, k=2, fused=True).eval()
    x = torch.randn(16, 4)
    x[3] = NAN
    with torch.no_grad():
        y = block(x)
    r = block.routing
    assert r.host_counts is None and r.token_index.shape[0] == 16 * 2   # nothing read, the tail still listed
    assert (r.expert_index[-2:] == E - 1).all() and sum(r.counts) == 15 * 2  # reading cuts it
    monkeypatch.undo()
    with torch.no_grad():
        y_ref = block(x)
    assert torch.equal(y[torch.arange(16) != 3], y_ref[torch.arange(16) != 3]) and y[3].isnan().all()


def test_gradients_of_the_experts_are_the_finite_tokens_and_the_router_shows_the_nan():
    # the experts' gradients from the clean tokens are those without the NaN token; the router's weight
    # gradient sums over every token's input, the NaN one included, so it is NaN, as a dense layer's would be
    # (a GradScaler skips that step)
    block, x = make(dict(k=2, aux_criterion="switch", **CAP))
    block.train()
    y = block(with_bad(x, BAD_ROWS["nan"]))
    (y[masked_out()].sum() + block.aux_loss).backward()
    grads = [p.grad.clone() for p in block.experts.parameters()]
    assert block.router.gate.weight.grad.isnan().all()
    block.zero_grad()
    y_ref = block(x, token_mask=masked_out())
    (y_ref[masked_out()].sum() + block.aux_loss).backward()
    for g, g_ref in zip(grads, [p.grad for p in block.experts.parameters()]):
        torch.testing.assert_close(g, g_ref)


def test_recorded_statistics_are_the_finite_tokens():
    block, x = make(dict(k=2, aux_criterion=None, **CAP))
    bad_x = with_bad(x, BAD_ROWS["nan"])
    with RoutingRecorder(block) as recorder:
        for _ in range(2):  # two forwards: the NaN of the first does not stay in the sums
            run(block, bad_x)
    with RoutingRecorder(block) as reference:
        for _ in range(2):
            run(block, x, token_mask=masked_out())
    s, ref = recorder.stats[""], reference.stats[""]
    assert s.tokens == ref.tokens == 2 * 15 and torch.equal(s.load, ref.load)
    assert s.entropy == pytest.approx(ref.entropy, rel=1e-12) and s.dropped == ref.dropped + 2 * 2
    assert torch.equal(s.position_load, ref.position_load)
