"""RoutingRecorder, the plots, the training log and ``moefy plot`` on every MoE family transformers ships, not
converted: the records equal what each family's experts module receives, the logits stay bit-identical, no hook
stays behind. One tiny random model per family (tests/hf_moe_families.py), built once.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="observing Hugging Face models needs transformers")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from hf_moe_families import SKIPPED, families, is_experts_implementation, tiny_input_ids, tiny_model  # noqa: E402

from moefy import RoutingRecorder, TrainingLogWriter  # noqa: E402
from moefy.observe.hf_routing import HFMoELayer, hf_moe_layers, is_hf_experts, token_choice_routing  # noqa: E402
from moefy.viz import plot_experts_load, plot_load_heatmap, plot_token_routing, plot_total_load  # noqa: E402

FAMILIES = sorted(families())
pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(model_type):
    if model_type in SKIPPED:
        pytest.skip(f"{model_type}: {SKIPPED[model_type]}")
    return tiny_model(model_type)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Seen:
    """Our own hooks beside the recorder's: what each layer's experts and router got, and its records."""

    def __init__(self, layers):
        self.calls = {layer.name: [] for layer in layers}     # experts-call arguments, in call order
        self.router = {layer.name: [] for layer in layers}    # router outputs
        self.records = {layer.name: [] for layer in layers}   # the layer's records
        self.handles = []
        for layer in layers:
            self.handles.append(layer.experts.register_forward_pre_hook(self._args(layer.name), with_kwargs=True))
            self.handles.append(layer.router.register_forward_hook(self._out(layer.name)))
            self.handles.append(layer.watch(lambda l: self.records[l.name].append(l.routing)))

    def _args(self, name):
        def hook(module, args, kwargs):
            self.calls[name].append(tuple(args) + tuple(kwargs.values()))
        return hook

    def _out(self, name):
        def hook(module, args, output):
            self.router[name].append((args, output))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def check_record(layer: HFMoELayer, record, args, router):
    """The record against our own view of that call."""
    e, (router_args, out) = layer.num_experts, router
    tokens, k = record.indices.shape
    # every slot is counted once: a real expert, a copy null expert, or dropped (a zero null expert)
    assert sum(record.counts[:e]) + record.null_slots + int(record.dropped) == tokens * k
    assert record.count.tolist() == torch.bincount(record.indices.flatten(), minlength=layer.num_columns).tolist()
    # the assignment lists say the same as (indices, weights), grouped by column
    dense = torch.zeros(tokens, layer.num_columns, dtype=torch.float64)
    listed = dense.index_put((record.token_index, record.expert_index), record.weight.double(), accumulate=True)
    assert torch.equal(listed, dense.scatter_add(1, record.indices, record.weights.double()))
    assert torch.equal(record.expert_index, record.expert_index.sort().values)
    logits = out[layer.router_index] if isinstance(out, tuple) else out
    if layer.reader == "experts call":
        _, index, weights = args
        assert torch.equal(record.indices, index) and torch.equal(record.weights, weights)
        assert torch.equal(record.logits, logits.reshape(tokens, -1).float())
    elif layer.reader in ("longcat zero experts", "zaya skip expert"):
        _, index, weights = args
        null = record.indices >= e
        assert torch.equal(record.indices[~null], index[~null]) and torch.equal(record.weights[~null], weights[~null])
        assert torch.equal(weights[null], torch.zeros_like(weights[null]))       # the experts compute nothing there
        zero_ids = (record.indices[null] - e) * e // len(layer.null_columns) if layer.reader.startswith("longcat") \
            else torch.zeros_like(index[null])
        assert torch.equal(index[null], zero_ids)
        assert torch.equal(record.logits, logits.reshape(tokens, -1).float())
    elif layer.reader == "llama4":
        scores, logits = out
        dense = torch.zeros_like(scores).scatter(1, record.indices, record.weights)
        assert torch.equal(dense, scores) and torch.equal(record.logits, logits)
        routed_in = router_args[0].repeat(e, 1) * dense.transpose(0, 1).reshape(-1, 1)
        assert torch.equal(args[0], routed_in)                                     # what the experts received
    elif layer.reader == "jetmoe":
        slots, batch_index, gates, expert_size, logits = out
        assert list(record.counts) == list(expert_size) == list(args[1])
        experts = torch.repeat_interleave(torch.arange(e), torch.tensor(expert_size))
        assert torch.equal(record.indices.flatten()[slots], experts)
        assert torch.equal(record.weights.flatten()[slots], gates)
        assert torch.equal(torch.div(slots, k, rounding_mode="floor"), batch_index)
        assert torch.equal(record.logits, logits)
    elif layer.reader == "doge":
        block, (index,) = layer.block, args
        assert torch.equal(record.indices, index)
        x = router_args[0].reshape(tokens, -1, 1)                                  # rebuild the routed part
        expert_w = block.act_fn(torch.matmul(block.down_embed(index), x).view(tokens, -1)) * record.weights
        routed = torch.matmul(expert_w.view(tokens, 1, -1), block.up_embed(index)).view(out[0].shape)
        hidden = router_args[0]
        shared = block.down_proj(block.act_fn(block.gate_proj(hidden)) * block.up_proj(hidden))
        torch.testing.assert_close(shared + routed, out[0], rtol=0, atol=1e-6)
    else:
        raise AssertionError(f"no check for reader {layer.reader}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_records_equal_what_the_experts_receive_and_the_logits_stay_bit_identical(model_type):
    model = model_of(model_type)
    ids = tiny_input_ids()
    hooks = hook_count(model)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    rec = RoutingRecorder(model)
    assert rec.skipped == [] and all(isinstance(b, HFMoELayer) for b in rec.blocks.values())
    seen = Seen(rec.blocks.values())
    with rec, torch.no_grad():
        observed = model(input_ids=ids).logits
    seen.remove()
    assert hook_count(model) == hooks                                  # nothing left behind
    assert torch.equal(observed, reference)
    tokens = ids.numel()
    for name, layer in rec.blocks.items():
        records = seen.records[name]
        assert records and len(records) == len(seen.calls[name]) == len(seen.router[name])
        for record, args, router in zip(records, seen.calls[name], seen.router[name]):
            assert record.tokens_shape in ((2, 6), (tokens,)) and record.num_tokens == tokens
            check_record(layer, record, args, router)
        stats = rec.stats[name]
        assert stats.forwards == len(records) and stats.tokens == tokens * len(records)
        assert stats.load.tolist() == [float(sum(r.count[c] for r in records)) for c in range(layer.num_columns)]
        assert 0 < stats.entropy <= torch.log(torch.tensor(float(layer.num_columns))) + 1e-6
    fig = plot_load_heatmap(rec)
    assert len(fig.axes[0].get_yticklabels()) == len(rec.blocks)
    name, layer = next(iter(rec.blocks.items()))
    assert len(plot_total_load(layer, rec.stats[name].load).axes) == 1
    if layer.reader != "experts call" or model_type == "mixtral":  # one per reader: 8+ panels cost ~0.1 s
        assert len(plot_experts_load(layer, rec.stats[name].position_load).axes) >= layer.num_columns
        fig = plot_token_routing([f"t{i}" for i in range(ids.shape[1])], rec, sample=1)
        assert len(fig.axes[0].get_yticklabels()) == len(rec.blocks)


def test_every_family_builds_with_a_moe_layer_and_is_observed():
    """The survey the README's table quotes: every text MoE family builds here and has an observed MoE layer;
    in the families that use ``@use_experts_implementation``, every decorated experts module is one observed."""
    assert len(FAMILIES) >= 49
    for model_type in FAMILIES:
        model = model_of(model_type)
        layers, skipped = hf_moe_layers(model)
        assert layers and not skipped, model_type
        if families()[model_type].uses_experts_implementation:
            decorated = {id(m) for m in model.modules() if is_experts_implementation(m)}
            assert decorated == {id(layer.experts) for layer in layers}, model_type


def test_zero_and_copy_null_experts_are_columns_of_their_own():
    """LongCat-Flash's zero (identity) experts are copy columns; Zaya's skip expert a zero column (dropped) —
    while the experts module sees them as weight-0 slots of a real expert."""
    longcat = model_of("longcat_flash")
    with RoutingRecorder(longcat) as rec, torch.no_grad():
        longcat(input_ids=tiny_input_ids())
    layer = rec.blocks["model.layers.0.mlp"]
    assert layer.null_columns == ("copy", "copy") and layer.num_columns == 10
    assert layer.routing.null_slots == sum(layer.routing.counts[8:]) > 0 and int(layer.routing.dropped) == 0
    assert rec.summary()[0]["null_columns"] == ["copy", "copy"]

    zaya = model_of("zaya")
    router = zaya.model.layers[0].mlp.gate
    biases = router.balancing_biases.clone()
    router.balancing_biases[-1] = 1e-3                  # the skip expert wins for about half the tokens
    try:
        with RoutingRecorder(zaya) as rec, torch.no_grad():
            zaya(input_ids=tiny_input_ids())
    finally:
        router.balancing_biases.copy_(biases)
    r = rec.blocks["model.layers.0.mlp"].routing
    assert r.null_columns == ("zero",) and 0 < r.counts[-1] == int(r.dropped) < r.num_tokens


def test_recorder_gradients_training_mode_and_detach():
    """Hooks only: the same gradients with and without the recorder; nothing recorded when disabled or
    detached; the routing of a second forward adds up."""
    model = model_of("qwen3_moe")
    ids = tiny_input_ids()

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = grads()
    rec = RoutingRecorder(model)
    with rec:
        observed = grads()
        rec.enabled = False
        grads()
        rec.enabled = True
        grads()
    grads()                                              # detached: not recorded
    model.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(reference, observed))
    assert all(s.forwards == 2 and s.tokens == 2 * ids.numel() for s in rec.stats.values())


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_every_experts_implementation_and_greedy_generate(implementation):
    """The record is the experts call's arguments whichever implementation transformers dispatches to; greedy
    generation is unchanged and every decoding step is recorded."""
    model = model_of("mixtral")
    ids = tiny_input_ids()
    with RoutingRecorder(model) as rec, torch.no_grad():
        eager = [b.routing for b in (model(input_ids=ids), *rec.blocks.values())[1:]]
    try:
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            reference = model.generate(ids, max_new_tokens=3, do_sample=False)
            logits = model(input_ids=ids).logits
        with RoutingRecorder(model) as rec, torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits)
            for r, layer in zip(eager, rec.blocks.values()):
                assert torch.equal(r.indices, layer.routing.indices) and torch.equal(r.weights, layer.routing.weights)
            rec.reset()
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), reference)
    finally:
        model.set_experts_implementation("eager")
    stats = rec.stats["model.layers.0.mlp"]
    assert stats.forwards == 3 and stats.tokens == ids.numel() + 2 * ids.shape[0]  # prefill, then 1 token each
    assert stats.position_load is None                                               # (2, 6) then (2, 1)
    assert float(stats.load.sum()) == stats.tokens * 2


def test_training_log_and_moefy_plot_read_an_unconverted_model(tmp_path):
    from moefy.observe import read_log
    from moefy.observe.cli import main
    model = model_of("longcat_flash")                   # null columns in the log too
    with RoutingRecorder(model) as rec, TrainingLogWriter(tmp_path / "log.jsonl") as log, torch.no_grad():
        for epoch in (1, 2):
            rec.reset()
            model(input_ids=tiny_input_ids(seed=epoch))
            log.write(epoch, rec, {"loss": 1.0 / epoch})
    parsed = read_log(tmp_path / "log.jsonl")
    assert list(parsed.layers) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    series = parsed.layers["model.layers.0.mlp"]
    assert series.null_columns == ["copy", "copy"] and len(series.utilization[-1]) == 10
    assert series.utilization[-1] == pytest.approx(rec.stats["model.layers.0.mlp"].utilization, abs=1e-6)
    assert main(["plot", str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "plots"), "--dpi", "30"]) == 0
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())


def test_a_model_without_moe_layers_is_refused_by_name():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="no MoEBlock and no Hugging Face MoE layer"):
        RoutingRecorder(llama)
    assert not any(is_hf_experts(m) for m in llama.modules())
    with pytest.raises(TypeError, match="model must be"):
        hf_moe_layers("mixtral")
    index, weights, logits = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"logits have 4 columns but num_experts=3"):
        token_choice_routing(index, weights, logits, 3)
    with pytest.raises(ValueError, match=r"indices and weights must be \(T, k\)"):
        token_choice_routing(index, weights[:, :1], logits, 4)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        token_choice_routing(weights, weights, logits, 4)
    with pytest.raises(TypeError, match="callback must be callable"):
        hf_moe_layers(model_of("mixtral"))[0][0].watch("print")
    r = token_choice_routing(torch.tensor([[0, 4], [1, -1], [3, 1]]), torch.ones(3, 2), logits, 4, (1, 3))
    assert r.counts == (1, 2, 0, 1) and int(r.dropped) == 2 and r.tokens_shape == (1, 3)   # 4, -1: sentinels
    assert r.token_index.tolist() == [0, 1, 2, 2] and r.expert_index.tolist() == [0, 1, 1, 3]
