"""Routing health (issue 24, part 4): MaxVio, dead experts, load CV, both entropies, co-activation, the
layer-to-layer top-1 transitions and the collapse alarm, against hand computations on hand-made routings (identity
routers: the logits are the input), then end to end on a moefy model and on a Hugging Face model as transformers
ships it."""
import logging
import math

import pytest
import torch
from torch import nn

from conftest import LinearMixture
from moefy.observe.health import (Crossing, HealthThresholds, LayerHealth, dead_experts, load_cv, load_entropy,
                                  max_vio, model_health)
from moefy.observe.recorder import RoutingRecorder, coactivation_counts, top1_columns

NAN = float("nan")


def entropy_of(load):
    total = sum(load)
    return -sum(v / total * math.log(v / total) for v in load if v)


def softmax_entropy(logits):
    z = [math.exp(v) for v in logits]
    return -sum(v / sum(z) * math.log(v / sum(z)) for v in z)


# ------------------------------------------------------------------------------------------ pure functions
def test_metrics_of_a_load_by_hand():
    load = [4, 0, 2, 2]                                         # mean 2
    assert max_vio(load) == 4 / 2 - 1 == 1.0
    assert load_cv(load) == pytest.approx(math.sqrt((2 ** 2 + 2 ** 2 + 0 + 0) / 4) / 2, abs=1e-15)
    assert load_entropy(load) == pytest.approx(1.5 * math.log(2), abs=1e-15)  # f = 1/2, 0, 1/4, 1/4
    assert dead_experts(load) == [1]
    assert max_vio([3, 3, 3]) == 0 and load_cv([3, 3, 3]) == 0 and load_entropy([3, 3, 3]) == pytest.approx(math.log(3))
    assert max_vio([0, 7, 0]) == 2 and load_entropy([0, 7, 0]) == 0  # collapsed: E - 1
    assert max_vio(torch.tensor([0.0, 0.0])) is None and load_cv([0, 0]) is None and load_entropy([0]) is None
    assert dead_experts(torch.zeros(3)) == [0, 1, 2]
    h = LayerHealth.of([4, 0, 2, 2], batch_max_vio=[1.0, None, 0.5], token_entropy=0.3)
    assert (h.max_vio, h.max_vio_batch, h.dead, h.dead_fraction, h.token_entropy) == (1.0, 0.75, (1,), 0.25, 0.3)
    whole = model_health({"a": h, "b": LayerHealth.of([1, 1, 1, 5])})
    assert whole == {"max_vio_mean": (1.0 + 1.5) / 2, "max_vio_max": 1.5, "max_vio_batch_mean": 0.75, "dead": 1,
                     "experts": 8, "dead_fraction": 1 / 8, "worst_layer": "b"}
    for bad in ([], [1, -1], ["1"], [True]):
        with pytest.raises(ValueError, match="load must be a non-empty sequence of counts >= 0"):
            max_vio(bad)


def test_thresholds_refuse_bad_bounds_by_name():
    with pytest.raises(ValueError, match=r"HealthThresholds.max_vio must be None or a finite number >= 0, got -1"):
        HealthThresholds(max_vio=-1)
    with pytest.raises(ValueError, match=r"HealthThresholds.dead_fraction must be None or a number in \[0, 1\]"):
        HealthThresholds(dead_fraction=1.5)
    with pytest.raises(ValueError, match="min_load_entropy"):
        HealthThresholds(min_load_entropy=float("inf"))
    with pytest.raises(TypeError, match="alarm must be a HealthThresholds"):
        RoutingRecorder(LinearMixture(2, 2, 2), alarm={"max_vio": 1.0})
    assert not HealthThresholds().active and HealthThresholds(max_cv=0).active


# ------------------------------------------------------------------------------------------ hand-made routing
class TwoLayers(nn.Module):
    """Two MoE layers routing the same input with identity-like routers: layer a (4 experts + a copy null
    column, k=2) reads the logits x, layer b (5 experts, k=2) the logits x[[4, 0, 1, 2, 3]]."""

    def __init__(self):
        super().__init__()
        self.a = LinearMixture(5, 5, 4, k=2, null_experts={"copy": 1})
        self.b = LinearMixture(5, 5, 5, k=2)
        with torch.no_grad():
            self.a.router.gate.weight.copy_(torch.eye(5))
            self.b.router.gate.weight.copy_(torch.eye(5)[[4, 0, 1, 2, 3]])

    def forward(self, x, token_mask=None):
        return self.a(x, token_mask=token_mask) + self.b(x, token_mask=token_mask)


def rows(*picks):
    """One token per (first, second) pick: logit 4 on the first column, 3 on the second, 0 elsewhere."""
    x = torch.zeros(len(picks), 5)
    for t, (first, second) in enumerate(picks):
        x[t, first], x[t, second] = 4.0, 3.0
    return x


def batch_one():
    """(2, 3) tokens: 4 routed, token 4 non-finite (NaN), token 5 masked out."""
    x = torch.cat([rows((0, 1), (1, 2), (4, 0), (2, 1)), torch.full((1, 5), NAN), rows((0, 1))]).view(2, 3, 5)
    return x, torch.tensor([[True, True, True], [True, True, False]])


BATCH_TWO = rows((3, 4), (4, 3), (0, 1), (0, 1))              # (4,) tokens, no mask


def test_recorder_health_matches_the_hand_computation():
    model = TwoLayers().eval()
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(*batch_one())
        a, b = rec.stats["a"], rec.stats["b"]
        # layer a picks (0, 1), (1, 2), (copy, 0), (2, 1); b reads x[[4, 0, 1, 2, 3]]: (1, 2), (2, 3), (0, 1), (3, 2)
        assert a.load.tolist() == [2, 3, 2, 0, 1] and b.load.tolist() == [1, 2, 3, 2, 0]
        assert a.health.dead == (3,) and b.health.dead == (4,)    # over the recorded batches so far
        model(BATCH_TWO)
    # batch two: a picks (3, copy), (copy, 3), (0, 1), (0, 1); b picks (4, 0), (0, 4), (1, 2), (1, 2)
    assert a.load.tolist() == [4, 5, 2, 2, 3] and b.load.tolist() == [3, 4, 5, 2, 2]
    assert a.batch_max_vio == pytest.approx([3 / (7 / 4) - 1, 2 / 1.5 - 1])    # loads [2,3,2,0], [2,2,0,2]
    assert b.batch_max_vio == pytest.approx([3 / 1.6 - 1, 2 / 1.6 - 1])        # [1,2,3,2,0], [2,2,2,0,2]
    ha, hb = a.health, b.health
    assert ha.max_vio == pytest.approx(5 / (13 / 4) - 1) and hb.max_vio == pytest.approx(5 / 3.2 - 1)
    assert ha.max_vio_batch == pytest.approx((5 / 7 + 1 / 3) / 2) and hb.max_vio_batch == pytest.approx((0.875 + 0.25) / 2)
    assert ha.dead == () and hb.dead == ()                    # the copy column is not an expert
    mean = 13 / 4
    assert ha.cv == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in [4, 5, 2, 2]) / 4) / mean)
    assert ha.load_entropy == pytest.approx(entropy_of([4, 5, 2, 2]))      # 4 experts, not the copy column
    assert hb.load_entropy == pytest.approx(entropy_of([3, 4, 5, 2, 2]))
    # token entropy: the 8 finite routed tokens, softmax over a's 5 columns of (4, 3, 0, 0, 0)
    assert ha.token_entropy == pytest.approx(softmax_entropy([4, 3, 0, 0, 0]), rel=1e-6)
    assert a.coactivation.tolist() == [[4, 3, 0, 0], [3, 5, 2, 0], [0, 2, 2, 0], [0, 0, 0, 2]]
    assert b.coactivation.tolist() == [[3, 1, 0, 0, 2], [1, 4, 3, 0, 0], [0, 3, 5, 2, 0], [0, 0, 2, 2, 0],
                                       [2, 0, 0, 0, 2]]
    assert a.multi_expert and a.transition_to == "b" and b.transition_to is None and b.transition is None
    expected = torch.zeros(5, 5)                              # a's top-1 (copy = column 4) -> b's top-1
    for source, target in [(0, 1), (1, 2), (4, 0), (2, 3), (3, 4), (4, 0), (0, 1), (0, 1)]:
        expected[source, target] += 1
    assert a.transition.tolist() == expected.tolist()
    assert rec.model_health()["worst_layer"] == "b"           # 5/3.2 - 1 = 0.5625 > 5/(13/4) - 1 = 7/13
    summary = {s["layer"]: s for s in rec.summary()}
    assert summary["a"]["dead"] == [] and summary["a"]["transition_to"] == "b"
    assert summary["a"]["coactivation"] == a.coactivation.int().tolist() and "transition" not in summary["b"]
    assert summary["b"]["max_vio"] == round(5 / 3.2 - 1, 6) and summary["a"]["cv"] == round(ha.cv, 6)
    assert "coactivation" not in rec.summary(matrices=False)[0]


def test_model_health_picks_the_worst_layer():
    model = TwoLayers().eval()
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(*batch_one())
    whole = rec.model_health()                                # a: 5/7, b: 0.875
    assert whole["worst_layer"] == "b" and whole["max_vio_max"] == pytest.approx(3 / 1.6 - 1)
    assert whole["dead"] == 2 and whole["experts"] == 9 and whole["dead_fraction"] == pytest.approx(2 / 9)


def test_helpers_on_lists_and_ties():
    # tokens 0: experts 0, 2; 1: expert 2 and the hole (column 3, left out); 2: nothing real
    counts = coactivation_counts(torch.tensor([0, 1, 0, 1, 2, 5]), torch.tensor([0, 2, 2, 3, 3, 1]), 3)
    assert counts.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]
    # 70 experts (and a hole, column 70): the slot-pair path, against the sets of each token
    generator = torch.Generator().manual_seed(0)
    picks = torch.stack([torch.randperm(71, generator=generator)[:3] for _ in range(50)])   # (50, 3)
    tokens = torch.arange(50).repeat_interleave(3)
    expected = torch.zeros(70, 70, dtype=torch.float64)
    for row in picks.tolist():
        real = [c for c in row if c < 70]
        for i in real:
            for j in real:
                expected[i, j] += 1
    assert torch.equal(coactivation_counts(tokens, picks.reshape(-1), 70, 50), expected)
    assert torch.equal(coactivation_counts(tokens, picks.reshape(-1), 70), expected)
    block = LinearMixture(4, 4, 4, k=2).eval()
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.eye(4))
        block(torch.tensor([[1.0, 0, 1, 0], [0, 2, 0, 1]]))   # token 0: a tie between columns 0 and 2
    assert top1_columns(block.routing).tolist() == [0, 1]


def test_alarm_fires_exactly_when_a_layer_crosses(caplog):
    block = LinearMixture(3, 3, 3, k=1).eval()
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.eye(3))
    balanced, collapsed, at_bound = torch.eye(3), torch.eye(3)[[0, 0, 0]], torch.eye(3)[[0, 0, 1]]
    rec = RoutingRecorder(block, alarm=HealthThresholds(max_vio=1.0, dead_fraction=0.5, min_load_entropy=0.1))
    caplog.set_level(logging.INFO, logger="moefy.observe.health")
    fired = []
    with rec, torch.no_grad():
        for batch, x in enumerate([balanced, collapsed, collapsed, at_bound, balanced, collapsed], start=1):
            block(x)
            fired.append([r.getMessage() for r in caplog.records if r.levelno == logging.WARNING])
            caplog.clear()
    # batch 4: loads [2, 1, 0]: MaxVio exactly 1 (not beyond), 1/3 dead (within), entropy 0.64 (within)
    assert [bool(f) for f in fired] == [False, True, False, False, False, True]
    assert fired[1] == ["routing health: layer '' crossed MaxVio 2 > max_vio=1; dead-expert fraction 0.6667 > "
                        "dead_fraction=0.5; load entropy (nats) 0 < min_load_entropy=0.1 at batch 2"]
    assert rec.crossings == [Crossing("", 2, "max_vio", 2.0, 1.0), Crossing("", 2, "dead_fraction", 2 / 3, 0.5),
                             Crossing("", 2, "min_load_entropy", 0.0, 0.1), Crossing("", 6, "max_vio", 2.0, 1.0),
                             Crossing("", 6, "dead_fraction", 2 / 3, 0.5),
                             Crossing("", 6, "min_load_entropy", 0.0, 0.1)]
    quiet = RoutingRecorder(block)                            # no thresholds: no alarm
    with quiet, torch.no_grad():
        block(collapsed)
    assert quiet.crossings == [] and not caplog.records


class Run(nn.Module):
    """Runs ``blocks`` (registered in this order) on the same input in the order ``order`` (names)."""

    def __init__(self, **blocks):
        super().__init__()
        self.blocks = nn.ModuleDict(blocks)
        self.order = list(blocks)

    def forward(self, x):
        for name in self.order:
            self.blocks[name](x)


def one_hot_router(route="tokens", permutation=(0, 1, 2)):
    block = LinearMixture(3, 3, 3, k=1, route=route)
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.eye(3)[list(permutation)])
    return block


def test_transitions_follow_the_forward_pair_samples_and_refuse_other_shapes(caplog):
    x = torch.eye(3)[[0, 1, 1, 2]].unsqueeze(1).expand(4, 5, 3)  # 4 samples of 5 equal tokens
    # registered first, second; run second, then first: first's logits x[[2, 0, 1]] -> column (c + 1) % 3
    model = Run(first=one_hot_router("samples", (2, 0, 1)), second=one_hot_router("samples")).eval()
    model.order = ["second", "first"]
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(x)
        model.blocks["second"](x)                               # outside a forward of the model: not paired
    second = rec.stats["blocks.second"]
    assert second.transition_to == "blocks.first" and rec.stats["blocks.first"].transition is None
    assert second.transition.tolist() == [[0, 1, 0], [0, 0, 2], [1, 0, 0]]  # per sample: c -> (c + 1) % 3
    assert second.transition_refused.startswith("it ran outside a forward of the recorded model")
    mixed = Run(first=one_hot_router("samples"), tokens=one_hot_router()).eval()   # per sample, then per token
    with RoutingRecorder(mixed) as rec, torch.no_grad(), caplog.at_level(logging.WARNING):
        mixed(x)
        mixed(x)
        mixed.order = ["first", "first", "tokens"]              # the same layer twice in a row: no pair
        mixed(x)
    s = rec.stats["blocks.first"]
    assert s.transition is None and "(4,)" in s.transition_refused and "(4, 5)" in s.transition_refused
    warned = [r.getMessage() for r in caplog.records if "transitions" in r.getMessage()]
    assert warned == [f"routing health: no top-1 transitions: {s.transition_refused}"]  # once
    assert "transition" not in rec.summary()[0]
    caplog.clear()
    three = Run(a=one_hot_router(), b=one_hot_router(), c=one_hot_router()).eval()
    with RoutingRecorder(three) as rec, torch.no_grad(), caplog.at_level(logging.WARNING):
        three(x)
        three.order = ["a", "c"]                                # a followed by c now: not counted, said once
        three(x)
        three(x)
    a = rec.stats["blocks.a"]
    assert a.transition_to == "blocks.b" and a.transition.sum() == 20
    assert a.transition_refused == "'blocks.a' was followed by 'blocks.b' and later by 'blocks.c': transitions are " \
                                   "kept to 'blocks.b' only"
    assert len([r for r in caplog.records if "later by" in r.getMessage()]) == 1


def test_expert_choice_coactivation_is_the_assignments():
    torch.manual_seed(2)
    block = LinearMixture(6, 6, 4, expert_choice=True, capacity=3).eval()
    with RoutingRecorder(block) as rec, torch.no_grad():
        block(torch.randn(10, 6))
    r, s = block.routing, rec.stats[""]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    experts_of = {}
    for t, e in zip(r.token_index.tolist(), r.expert_index.tolist()):
        experts_of.setdefault(t, set()).add(e)
    for chosen in experts_of.values():
        for i in chosen:
            for j in chosen:
                expected[i, j] += 1
    assert s.multi_expert and torch.equal(s.coactivation, expected)
    assert s.coactivation.diagonal().tolist() == s.expert_load.tolist() == [3, 3, 3, 3]


# ------------------------------------------------------------------------------------------ end to end
def reference(picks, num_columns, num_experts):
    """Brute force from per-forward (indices (T, k), weights (T, k)) per layer: loads, co-activation, top-1."""
    load = [0] * num_columns
    coact = [[0] * num_experts for _ in range(num_experts)]
    top1 = []
    for index, weight in picks:
        for row, w in zip(index.tolist(), weight.tolist()):
            if any(math.isnan(v) for v in w):
                top1.append(-1)
                continue
            for c in row:
                load[c] += 1
            real = [c for c in row if c < num_experts]
            for i in real:
                for j in real:
                    coact[i][j] += 1
            best = max(w)
            top1.append(min(c for c, v in zip(row, w) if v == best))
    return load, coact, top1


def transitions(top_a, top_b, rows, cols):
    out = [[0] * cols for _ in range(rows)]
    for i, j in zip(top_a, top_b):
        if i >= 0 and j >= 0:
            out[i][j] += 1
    return out


def test_moefy_model_end_to_end_with_the_log_and_plot(tmp_path):
    from moefy.observe.cli import main
    from moefy.observe.log import TrainingLogWriter, read_log
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), LinearMixture(8, 8, 4, k=2, layer_id=0), nn.ReLU(),
                          LinearMixture(8, 8, 3, k=2, hole=True, layer_id=1)).eval()
    picks = {1: [], 3: []}
    for i in (1, 3):
        model[i].register_forward_hook(lambda m, a, o, i=i: picks[i].append((m.routing.indices, m.routing.weights)))
    path = tmp_path / "log.jsonl"
    with RoutingRecorder(model) as rec, TrainingLogWriter(path) as log, torch.no_grad():
        for epoch in (1, 2):
            rec.reset()
            for p in picks.values():
                p.clear()
            for seed in (epoch, epoch + 10):
                model(torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed)))
            log.write(epoch, rec, {"loss": 1.0})
    load0, coact0, top0 = reference(picks[1], 4, 4)
    load1, coact1, top1 = reference(picks[3], 4, 3)
    s0, s1 = rec.stats["1"], rec.stats["3"]
    assert s0.load.tolist() == load0 and s1.load.tolist() == load1
    assert s0.coactivation.tolist() == coact0 and s1.coactivation.tolist() == coact1
    assert s0.transition.tolist() == transitions(top0, top1, 4, 4)
    assert s0.transition.sum() == 2 * 15
    assert s0.health.max_vio == pytest.approx(max(load0) / (sum(load0) / 4) - 1)
    assert s1.health.max_vio == pytest.approx(max(load1[:3]) / (sum(load1[:3]) / 3) - 1)  # the hole left out
    parsed = read_log(path)
    series = parsed.layers["1"]
    assert series.max_vio[-1] == pytest.approx(s0.health.max_vio, abs=1e-6)
    assert series.coactivation == coact0 and series.coactivation_epoch == 2
    assert series.transition == transitions(top0, top1, 4, 4) and series.transition_to == "3"
    assert parsed.layers["3"].transition is None and parsed.layers["3"].dead[-1] == list(s1.health.dead)
    assert main(["plot", str(path), "--out", str(tmp_path / "plots"), "--dpi", "30"]) == 0
    assert (tmp_path / "plots" / "health.png").stat().st_size > 1000


def test_hugging_face_model_end_to_end():
    pytest.importorskip("transformers")
    from hf_moe_families import tiny_input_ids, tiny_model
    model = tiny_model("mixtral")                             # 2 MoE layers, 8 experts, top-2, not converted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = RoutingRecorder(model)
        names = list(rec.blocks)
        picks = {name: [] for name in names}
        handles = [layer.experts.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: picks[name].append((tuple(args) + tuple(kwargs.values()))[1:3]),
            with_kwargs=True)
            for name, layer in rec.blocks.items()]
        with rec, torch.no_grad():
            model(input_ids=tiny_input_ids(seed=1))
            model(input_ids=tiny_input_ids(batch=3, length=4, seed=2))
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    (load0, coact0, top0), (load1, coact1, top1) = (reference(picks[n], 8, 8) for n in names)
    s0, s1 = rec.stats[names[0]], rec.stats[names[1]]
    assert s0.load.tolist() == load0 and s1.load.tolist() == load1 and sum(load0) == 2 * (12 + 12)
    assert s0.coactivation.tolist() == coact0 and s1.coactivation.tolist() == coact1
    assert s0.transition.tolist() == transitions(top0, top1, 8, 8) and s0.transition.sum() == 24
    batch = [index.reshape(-1).bincount(minlength=8).tolist() for index, _ in picks[names[0]]]
    assert s0.batch_max_vio == pytest.approx([max(b) / (sum(b) / 8) - 1 for b in batch])
    assert s0.health.dead == tuple(e for e in range(8) if load0[e] == 0)
    assert s0.health.load_entropy == pytest.approx(entropy_of(load0))
