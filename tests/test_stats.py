"""RoutingRecorder statistics against hand computations, and the training-log writer / parser."""
import json
import math

import pytest
import torch

from conftest import LinearMixture
from moefy.observe.log import LogFormatError, TrainingLogWriter, read_log
from moefy.observe.recorder import RoutingRecorder, labels_per_token, token_entropy


def identity_router_block(num_experts=3, hole=False, **kw):
    """D = E' and gate = identity: the logits are the input, so the routing is known by hand."""
    cols = num_experts + hole
    block = LinearMixture(cols, 2, num_experts, k=1, hole=hole, **kw)
    with torch.no_grad():
        block.router.gate.weight.copy_(torch.eye(cols))
    return block


def one_hot_tokens(columns, n_cols, scale=2.0):
    return scale * torch.eye(n_cols)[torch.tensor(columns)]


def softmax_entropy(logits):
    z = [math.exp(v) for v in logits]
    p = [v / sum(z) for v in z]
    return -sum(q * math.log(q) for q in p)


def test_recorder_matches_hand_counts_entropy_affinity_accuracy():
    block = identity_router_block(3).eval()
    rec = RoutingRecorder(block, num_classes=2)
    with rec:
        rec.labels = torch.tensor([0, 1, 1, 0])
        block(one_hot_tokens([0, 1, 2, 0], 3))           # experts 0, 1, 2, 0
        rec.labels = torch.tensor([1, 1])
        block(one_hot_tokens([2, 2], 3))                  # expert 2 twice
    s = rec.stats[""]
    assert s.forwards == 2 and s.tokens == 6 and s.slots == 6 and s.dropped == 0
    assert s.load.tolist() == [2, 1, 3]
    assert s.utilization == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    assert s.entropy == pytest.approx(softmax_entropy([2, 0, 0]), rel=1e-6)  # float32 router
    # class 0: tokens 0, 3 -> expert 0; class 1: expert 1 once, expert 2 three times
    assert s.affinity.tolist() == [[2, 0, 0], [0, 1, 3]]
    assert s.routing_acc == pytest.approx((2 + 3) / 6)
    block(one_hot_tokens([1], 3))                         # after exit: not recorded
    assert rec.stats[""].tokens == 6


def test_recorder_hole_counts_dropped_slots():
    block = identity_router_block(2, hole=True).eval()
    with RoutingRecorder(block) as rec:
        block(one_hot_tokens([0, 2, 2, 1, 0], 3))         # column 2 is the hole
    s = rec.stats[""]
    assert s.dropped == 2 and s.dropped_frac == pytest.approx(2 / 5)
    assert s.load.tolist() == [2, 1, 2] and s.affinity is None and s.routing_acc is None
    summary = rec.summary()[0]
    assert summary["hole"] is True and summary["dropped"] == pytest.approx(0.4)


def test_recorder_expert_choice_dropped_matches_routing():
    block = LinearMixture(8, 8, 4, expert_choice=True, capacity=3).eval()
    x = torch.randn(2, 10, 8)
    with RoutingRecorder(block) as rec:
        block(x)
        first = int(block.routing.dropped)
        block(x * -1)
        second = int(block.routing.dropped)
    s = rec.stats[""]
    assert s.dropped == first + second and s.slots == 40 and s.load.tolist() == [6, 6, 6, 6]
    assert first >= 20 - 12  # 4 experts x capacity 3 can cover at most 12 of 20 tokens


def test_per_sample_labels_expand_over_positions_and_position_load_sums():
    torch.manual_seed(1)
    block = LinearMixture(6, 6, 3, k=2).eval()
    x1, x2 = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    labels = torch.tensor([0, 1, 2, 1])
    with RoutingRecorder(block) as rec:
        rec.labels = labels
        block(x1)
        r1, load1 = block.routing, block.experts_load()
        block(x2)
        r2, load2 = block.routing, block.experts_load()
    s = rec.stats[""]
    assert torch.equal(s.position_load, (load1 + load2).double())
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for r in (r1, r2):
        for t, e in zip(r.token_index.tolist(), r.expert_index.tolist()):
            expected[labels[t // 5], e] += 1
    assert torch.equal(s.affinity, expected) and s.affinity.sum() == 2 * 20 * 2
    assert s.entropy == pytest.approx(float(torch.cat([token_entropy(r1.probs), token_entropy(r2.probs)]).mean()))


def test_labels_validation():
    block = LinearMixture(4, 4, 2).eval()
    block(torch.randn(3, 5, 4))
    assert labels_per_token(torch.arange(15).view(3, 5), block.routing).tolist() == list(range(15))
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\) with B=3"):
        labels_per_token(torch.zeros(4, dtype=torch.long), block.routing)
    with pytest.raises(TypeError, match="integer class ids"):
        labels_per_token(torch.zeros(3), block.routing)
    rec = RoutingRecorder(block, num_classes=2)
    with rec:
        rec.labels = torch.tensor([0, 1, 2])
        with pytest.raises(ValueError, match="num_classes=2"):
            block(torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="no MoEBlock"):
        RoutingRecorder(torch.nn.Linear(2, 2))


def test_enabled_flag_and_reset():
    block = LinearMixture(4, 4, 2).eval()
    with RoutingRecorder(block) as rec:
        rec.enabled = False
        block(torch.randn(7, 4))
        assert rec.stats[""].tokens == 0
        rec.enabled = True
        block(torch.randn(7, 4))
        assert rec.stats[""].tokens == 7
        rec.reset()
        assert rec.stats[""].tokens == 0 and rec.stats[""].load.tolist() == [0, 0]


def test_writer_round_trip_multi_layer(tmp_path):
    model = torch.nn.Sequential(LinearMixture(4, 4, 3, layer_id=0), LinearMixture(4, 4, 2, hole=True, layer_id=1))
    path = tmp_path / "log.jsonl"
    with TrainingLogWriter(path) as writer, RoutingRecorder(model) as rec:
        for epoch in (1, 2):
            rec.reset()
            rec.labels = torch.tensor([0, 1, 0, 1, 2, 2])
            model(torch.randn(6, 4))
            written = writer.write(epoch, rec, metrics={"loss": 1.0 / epoch})
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == written
    assert set(written) >= {"epoch", "routing_acc", "entropy", "utilization", "metrics", "layers"}
    assert written["utilization"] == written["layers"][0]["utilization"]      # top level = first layer
    log = read_log(path)
    assert log.epochs == [1, 2] and list(log.layers) == ["0", "1"]
    assert log.metrics == {"loss": [1.0, 0.5]}
    assert log.layers["1"].hole and log.layers["1"].num_columns == 3
    assert log.layers["0"].utilization[1] == pytest.approx(rec.stats["0"].utilization, abs=1e-6)
    assert log.layers["1"].affinity == rec.stats["1"].affinity.tolist()
    assert sum(map(sum, log.layers["1"].affinity)) == 6


@pytest.mark.parametrize("lines, line, message", [
    (['{"epoch": 1, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.5, 0.5]}',
      '{"epoch": 2, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.5, 0.5]'], 2, "not valid JSON"),
    (['{"epoch": 1, "routing_acc": 0.5, "utilization": [1.0]}'], 1, "missing field 'entropy'"),
    (['{"epoch": 1, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.5, 0.5]}', '',
      '{"epoch": 2, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.5, 0.2, 0.3]}'], 3, "has 3 values"),
    (['{"epoch": 2, "routing_acc": 0.5, "entropy": 1.0, "utilization": [1.0]}',
      '{"epoch": 2, "routing_acc": 0.5, "entropy": 1.0, "utilization": [1.0]}'], 2, "does not increase"),
    (['{"epoch": 1, "routing_acc": 1.5, "entropy": 1.0, "utilization": [1.0]}'], 1, r"\[0, 1\]"),
    (['{"epoch": true, "routing_acc": 0.5, "entropy": 1.0, "utilization": [1.0]}'], 1, "'epoch' must be an int"),
    (['{"epoch": 1, "routing_acc": null, "entropy": 1.0, "utilization": [0.5, 0.5], "affinity": [[1, 2, 3]]}'],
     1, "'affinity' must be"),
    (['[1, 2]'], 1, "expected a JSON object"),
])
def test_parser_names_the_bad_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogFormatError, match=message) as err:
        read_log(path)
    assert err.value.line == line and str(err.value).startswith(f"{path}:{line}: ")


def test_parser_empty_and_seed_example(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LogFormatError, match="the log is empty"):
        read_log(empty)
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"epoch": 1, "routing_acc": 0.5841, "entropy": 1.4012,
                                "utilization": [0.2257, 0.1031, 0.0735, 0.2797, 0.1871, 0.1309],
                                "metrics": {"accuracy": 0.4356, "loss": 2.5902}}) + "\n")
    log = read_log(seed)
    assert list(log.layers) == ["model"] and log.layers["model"].routing_acc == [0.5841]
    assert log.metrics == {"accuracy": [0.4356], "loss": [2.5902]}


# ------------------------------------------------------------------------------------------ routing health in the log
def test_health_fields_round_trip_and_old_logs_still_read(tmp_path):
    from moefy.observe.log import LayerSeries
    torch.manual_seed(4)
    model = torch.nn.Sequential(LinearMixture(4, 4, 3, k=2, layer_id=0), LinearMixture(4, 4, 2, hole=True, layer_id=1))
    path = tmp_path / "log.jsonl"
    with TrainingLogWriter(path) as writer, RoutingRecorder(model) as rec:
        for epoch in (1, 2):
            rec.reset()
            model(torch.randn(6, 4))
            summary = rec.summary()
            written = writer.write(epoch, rec, matrices=epoch == 2)
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert "coactivation" not in first["layers"][0] and "transition" not in first["layers"][0]
    assert written["max_vio"] == summary[0]["max_vio"] and "coactivation" not in written  # top level: scalars
    log = read_log(path)
    s0, s1 = log.layers["0"], log.layers["1"]
    h0, h1 = rec.stats["0"].health, rec.stats["1"].health
    assert s0.max_vio[1] == round(h0.max_vio, 6) and s0.max_vio_batch[1] == round(h0.max_vio_batch, 6)
    assert s0.cv[1] == round(h0.cv, 6) and s0.load_entropy[1] == round(h0.load_entropy, 6)
    assert s0.dead[1] == list(h0.dead) and s1.dead[1] == list(h1.dead) and s0.has_health
    assert s0.coactivation == rec.stats["0"].coactivation.tolist() and s0.coactivation_epoch == 2
    assert s0.transition == rec.stats["0"].transition.tolist() and s0.transition_to == "1"
    assert len(s0.transition) == 3 and len(s0.transition[0]) == 3 and sum(map(sum, s0.transition)) == 6
    assert s1.coactivation is None                                 # k = 1: only its diagonal: not written
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"epoch": 1, "routing_acc": None, "entropy": 0.5, "utilization": [0.5, 0.5]}) + "\n")
    series = read_log(old).layers["model"]
    assert isinstance(series, LayerSeries) and not series.has_health
    assert series.max_vio == [None] and series.dead == [None] and series.coactivation is None


def health_line(**fields):
    layer = {"routing_acc": None, "entropy": 0.5, "utilization": [0.5, 0.5]}
    return json.dumps({"epoch": 1, **layer, **fields})


def layers_line(a=None, b=None):
    layer = {"routing_acc": None, "entropy": 0.5, "utilization": [0.5, 0.5]}
    c = dict(layer, utilization=[0.2, 0.3, 0.5], hole=True)
    return json.dumps({"epoch": 1, **layer, "layers": [dict(layer, layer="a", **(a or {})),
                                                       dict(c, layer="b", **(b or {}))]})


@pytest.mark.parametrize("line, message", [
    (health_line(dead=[2]), r"'dead' must be an increasing list of expert ids in \[0, 2\)"),
    (health_line(dead=[1, 0]), r"'dead' must be an increasing list"),
    (health_line(max_vio=-0.1), r"'max_vio' must be a number in \[0, 1e300\] or null"),
    (health_line(load_entropy="high"), r"'load_entropy' must be a number"),
    (health_line(coactivation=[[1]]), r"'coactivation' must be 2 rows of 2 numbers"),
    (health_line(transition_to="a", transition=[[1]]), r"'transition' / 'transition_to' need 'layers'"),
    (layers_line(b={"coactivation": [[1, 0, 0]] * 3}), r"layers\[1\] \('b'\): 'coactivation' must be 2 rows of 2"),
    (layers_line(a={"transition_to": "c", "transition": [[1]]}), r"layers\[0\] \('a'\): 'transition_to' must name"),
    (layers_line(a={"transition": [[1, 2, 3]] * 2}), r"'transition_to' must name a layer of 'layers', got None"),
    (layers_line(a={"transition_to": "b", "transition": [[1, 2]] * 2}),
     r"layers\[0\] \('a'\): 'transition' must be 2 rows \(this layer's router columns\) of 3 numbers"),
])
def test_bad_health_fields_are_refused_by_reader_and_writer(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(LogFormatError, match=message) as err:
        read_log(path)
    assert err.value.line == 1
    entry = json.loads(line)
    if "transition" in entry:
        return  # a one-layer summary has no transition: log_entry writes no such field
    with TrainingLogWriter(tmp_path / "w.jsonl") as writer, pytest.raises(LogFormatError, match=message):
        writer.write(1, entry.get("layers") or [entry])
    assert (tmp_path / "w.jsonl").read_bytes() == b""


def test_the_largest_line_within_the_limits_is_not_refused_unparsed(tmp_path):
    """With every limit set, a line over 1 MiB is refused before json builds it if it holds more lists or values
    than a line within the limits can: co-activation and transition matrices are within them (on the code before
    they counted as an attack)."""
    from moefy.observe.log import LogLimits
    e, value = 64, 1.2345678901234567e-05                     # 22 bytes a number: the line passes 1 MiB
    layer = {"routing_acc": None, "entropy": 0.5, "utilization": [value] * e, "affinity": [[value] * e] * e,
             "dead": [], "max_vio": value, "coactivation": [[value] * e] * e}
    layers = [dict(layer, layer=f"l{i}", **({"transition_to": f"l{i + 1}", "transition": [[value] * e] * e}
                                          if i < 3 else {})) for i in range(4)]
    line = json.dumps({"epoch": 1, **{k: v for k, v in layer.items() if k != "coactivation"}, "layers": layers})
    assert len(line) > 1 << 20
    path = tmp_path / "big.jsonl"
    path.write_text(line + "\n")
    log = read_log(path, LogLimits(max_layers=4, max_columns=e, max_affinity_rows=e, max_metrics=1))
    assert log.layers["l0"].transition_to == "l1" and len(log.layers["l3"].coactivation) == e
