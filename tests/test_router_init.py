"""A router that starts informed: init_router's rows are the per-expert means / k-means centroids of each
mixture's router inputs (brute force, float64), normalised to unit L2 and scaled; k-means recovers separated
clusters; informed rows route expert i's tokens to expert i; per layer on a tiny Llama; save / load unaffected."""
import copy
import logging

import pytest
import torch
from torch import nn

import moefy
from moefy.convert import init_router, kmeans

D, E = 6, 3
DIRS = torch.eye(D, dtype=torch.float64)[:E] * 8  # (E, D): well separated cluster centres


def clusters(n=40, seed=0, std=0.3):
    """E batches (n, D) float64, batch i around DIRS[i]."""
    g = torch.Generator().manual_seed(seed)
    return [DIRS[i] + std * torch.randn(n, D, dtype=torch.float64, generator=g) for i in range(E)]


def mixture(**kw):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, D)).double()
    return moefy.moefy(dense, E, k=1, expert_noise=0.1, **kw).double()


def brute_mean(rows):
    """The mean of a list of (D,) float64 rows, one addition at a time."""
    total = torch.zeros(D, dtype=torch.float64)
    for r in rows:
        total = total + r
    return total / len(rows)


def unit(v):
    return v / v.square().sum().sqrt()


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_recovers_separated_clusters_and_centroids_are_cluster_means():
    points = torch.cat(clusters())                                       # (3·40, D)
    truth = torch.arange(E).repeat_interleave(40)
    centres, labels = kmeans(points, E, seed=3)
    # the same partition up to a permutation, each centroid next to its true centre
    perm = [int(labels[truth == i][0]) for i in range(E)]
    assert sorted(perm) == list(range(E))
    assert torch.equal(labels, torch.tensor(perm)[truth])
    assert (centres[perm] - DIRS).abs().max() < 0.2
    for j in range(E):  # every centroid is exactly its points' mean
        members = [points[n] for n in range(len(points)) if labels[n] == j]
        assert (centres[j] - brute_mean(members)).abs().max() < 1e-10
    again = kmeans(points, E, seed=3)
    assert torch.equal(again[0], centres) and torch.equal(again[1], labels)  # deterministic for a seed


def test_kmeans_does_not_leave_a_cluster_empty():
    points = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]], dtype=torch.float64)
    centres, labels = kmeans(points, 3, seed=0)
    assert torch.bincount(labels, minlength=3).min() >= 1 and not centres.isnan().any()


# ------------------------------------------------------------------------------------------ module level
@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (True, 2.5), (False, 1.0), (False, 0.5)])
def test_mean_rows_are_the_per_expert_means(normalize, scale):
    mix, data = mixture(), clusters()
    batches = [[d[:25], d[25:].reshape(3, 5, D)] for d in data]          # two batches per expert, any leading shape
    rows = init_router(mix, batches, "mean", normalize=normalize, scale=scale)[""]
    for i in range(E):
        mean = brute_mean(list(data[i]))
        want = scale * (unit(mean) if normalize else mean)
        assert (rows[i] - want).abs().max() < 1e-10
        assert (mix.router.gate.weight[i].detach() - want).abs().max() < 1e-10  # the gate holds them (float64)


def test_kmeans_rows_are_the_centroids_of_the_router_inputs():
    mix, data = mixture(), clusters()
    gate_before = mix.router.gate.weight.detach().clone()
    rows = init_router(mix, [d.reshape(4, 10, D) for d in data], "kmeans", seed=1)[""]
    points = torch.cat(data)
    centres, labels = kmeans(points, E, seed=1)
    for j in range(E):
        members = [points[n] for n in range(len(points)) if labels[n] == j]
        assert (rows[j] - unit(brute_mean(members))).abs().max() < 1e-10
    assert (rows @ DIRS.T / 8).max(0).values.min() > 0.99  # each true direction has its row
    assert not torch.equal(gate_before, mix.router.gate.weight)


@pytest.mark.parametrize("method", ["mean", "kmeans"])
def test_informed_rows_route_expert_i_tokens_to_expert_i(method):
    mix, data = mixture(), clusters(seed=1)
    arg = data if method == "mean" else list(data)
    rows = init_router(mix, arg, method)[""]
    owner = (rows @ DIRS.T).argmax(0)  # kmeans: whichever row sits on cluster i's direction
    assert method == "kmeans" or torch.equal(owner, torch.arange(E))
    test = clusters(n=20, seed=7)
    for i in range(E):
        with torch.no_grad():
            mix(test[i])
        assert torch.equal(mix.routing.indices[:, 0], torch.full((20,), int(owner[i])))


def test_only_the_real_experts_rows_are_set():
    mix = mixture(hole=True)
    hole_row = mix.router.gate.weight[E].detach().clone()                 # the hole column, the last
    rows = init_router(mix, clusters(), "mean")[""]
    assert rows.shape == (E, D) and torch.equal(mix.router.gate.weight[E], hole_row)


def test_modes_restored_and_log_line(caplog):
    mix = mixture().train()
    mix.experts[1].eval()  # a mixed flag must survive too
    flags = [m.training for m in mix.modules()]
    with caplog.at_level(logging.INFO, logger="moefy"):
        init_router(mix, clusters(), "mean")
    assert [m.training for m in mix.modules()] == flags
    assert "router rows of 1 mixture(s) set from per-expert means" in caplog.text and "unit L2 norm" in caplog.text


def test_moefy_router_init_equals_init_router_after():
    data = clusters()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, D)).double()
    via = moefy.moefy(dense, E, k=1, router_init="kmeans", router_data=list(data))
    after = moefy.moefy(dense, E, k=1)
    init_router(after, list(data), "kmeans")
    assert torch.allclose(via.router.gate.weight.double(), after.router.gate.weight.double(), atol=1e-7)


# ---------------------------------------------------------------------------------------- a 2-layer Llama
transformers = pytest.importorskip("transformers")
CFG = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=2)


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).double().eval()


def prompts(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 5), generator=g) for _ in range(n)]


def mlp_inputs(dense, batches):
    """{layer: (N, 16) float64} every MLP input of the dense model on batches, by forward pre-hooks."""
    seen = {l: [] for l in range(2)}
    hooks = [dense.model.layers[l].mlp.register_forward_pre_hook(
        lambda m, a, l=l: seen[l].append(a[0].reshape(-1, 16))) for l in range(2)]
    with torch.no_grad():
        for b in batches:
            dense(b)
    for h in hooks:
        h.remove()
    return {l: torch.cat(v) for l, v in seen.items()}


def test_llama_each_layer_gets_rows_from_its_own_inputs(tmp_path):
    model = llama()
    dense = copy.deepcopy(model)
    data = [prompts(1), prompts(2)]
    moefy.moefy(model, 2, k=1, target="mlp")
    model.double()
    rows = init_router(model, data, "mean")
    assert sorted(rows) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for l in range(2):
        for i in range(2):
            x = mlp_inputs(dense, data[i])[l]
            want = unit(x.sum(0) / x.shape[0])
            assert (rows[f"model.layers.{l}.mlp"][i] - want).abs().max() < 1e-10
    assert not torch.allclose(rows["model.layers.0.mlp"], rows["model.layers.1.mlp"])
    # kmeans over the same data: per layer, the centroids of that layer's inputs
    rows = init_router(model, data[0] + data[1], "kmeans", seed=2)
    for l in range(2):
        centres = kmeans(mlp_inputs(dense, data[0] + data[1])[l], 2, seed=2)[0]
        assert (rows[f"model.layers.{l}.mlp"] - centres / centres.norm(dim=1, keepdim=True)).abs().max() < 1e-10
    # save / load unaffected: the rows are router weights like any other
    moefy.save(model, tmp_path)
    loaded = moefy.load(llama(), tmp_path).eval()
    ids = prompts(9)[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(loaded.model.layers[1].mlp.router.gate.weight, model.model.layers[1].mlp.router.gate.weight)


def test_layerwise_sets_each_layer_from_inputs_after_the_earlier_layers_are_set():
    """Experts from two different models: layer 1's inputs depend on layer 0's router, so layerwise=True (what
    moefy(experts_from=..., router_init=...) uses) takes them after layer 0 is set; one pass takes them before."""
    a, b = llama(), llama()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    data = [prompts(1), prompts(2)]
    via_moefy, layerwise, one_pass = llama(), llama(), llama()
    moefy.moefy(via_moefy, k=1, target="mlp", experts_from=[a, b], router_init="mean", router_data=data)
    moefy.moefy(layerwise, k=1, target="mlp", experts_from=[a, b])
    moefy.moefy(one_pass, k=1, target="mlp", experts_from=[a, b])
    rows = init_router(layerwise, data, "mean", layerwise=True)
    flat = init_router(one_pass, data, "mean")  # layer 1 from inputs routed by layer 0's *random* router
    first, second = "model.layers.0.mlp", "model.layers.1.mlp"
    for name in (first, second):
        gate = via_moefy.get_submodule(name).router.gate.weight
        assert torch.equal(gate, rows[name].to(gate.dtype))
    assert torch.equal(rows[first], flat[first])  # layer 0's inputs do not depend on any router
    assert not torch.allclose(rows[second], flat[second])
    # brute force: layer 1's rows = means of its router inputs once layer 0 has the informed rows
    probe = llama()
    moefy.moefy(probe, k=1, target="mlp", experts_from=[a, b])
    with torch.no_grad():
        probe.model.layers[0].mlp.router.gate.weight.copy_(layerwise.model.layers[0].mlp.router.gate.weight)
    seen = {i: [] for i in range(2)}
    for i in range(2):
        hook = probe.model.layers[1].mlp.router.register_forward_pre_hook(
            lambda m, args, i=i: seen[i].append(args[0].detach().double()))
        with torch.no_grad():
            for batch in data[i]:
                probe(batch)
        hook.remove()
    want = torch.stack([unit(torch.cat(seen[i]).mean(0)) for i in range(2)])
    assert (rows[second] - want).abs().max() < 1e-10


def test_llama_through_moefy_with_dict_batches():
    model = llama()
    data = [[{"input_ids": b} for b in prompts(1)], [{"input_ids": b} for b in prompts(2)]]
    moefy.moefy(model, 2, k=1, target="mlp", router_init="mean", router_data=data)
    gate = model.model.layers[0].mlp.router.gate.weight
    assert torch.allclose(gate.norm(dim=1), torch.ones(2, dtype=gate.dtype))


def test_errors_name_the_argument():
    mix = mixture()
    with pytest.raises(ValueError, match=r"data: method='mean' needs one batch list per expert: mixture '\(root\)' "
                                         r"has 3 experts, data has 2"):
        init_router(mix, clusters()[:2], "mean")
    with pytest.raises(ValueError, match=r"data: mixture '\(root\)' read 2 router inputs, fewer than its 3 experts"):
        init_router(mix, torch.randn(2, D, dtype=torch.float64), "kmeans")
    with pytest.raises(ValueError, match=r"router_data: router_init='mean' needs router_data"):
        moefy.moefy(nn.Linear(D, D), E, router_init="mean")
    with pytest.raises(ValueError, match=r"router_data is given but router_init is None"):
        moefy.moefy(nn.Linear(D, D), E, router_data=[torch.randn(4, D)])


def test_benchmark_prints_a_table_of_the_three_starts():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "router_init.py"
    spec = importlib.util.spec_from_file_location("bench_router_init", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = bench.main(["--seeds", "2", "--steps", "3", "--dim", "4", "--hidden", "4", "--experts", "2"]).splitlines()
    assert len(lines) == 2 + 3 and lines[1] == "|---|---|---|"
    assert lines[0].startswith("| method | steps to held-out MSE")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["random", "mean", "kmeans"] and all(len(c) == 3 for c in cells)
    assert all(c[1].startswith(">") or float(c[1]) >= 0 for c in cells) and all(float(c[2]) >= 0 for c in cells)
