"""moefy.compress on moefied and imported models: scores, pruning and merging checked against hand computations.

- ``expert_scores`` equals a brute force that runs every expert on every token the block saw (read with a forward
  hook and the block's routing record) and counts / weighs each routed slot by hand: plain top-k, fused experts,
  a hole, null experts, a token capacity (both drop policies), a NaN token, an imported Qwen3-MoE and two
  family-routed imports (GPT-OSS, ERNIE-4.5).
- ``prune_experts``: removing experts no calibration token reaches leaves the outputs unchanged; the pruned block
  is an ordinary block (trains, copies, saves); groups and the selection bias follow the kept experts; a pruned
  Qwen3-MoE gives the logits of transformers' own Qwen3-MoE built with the kept experts.
- ``merge_experts``: singleton groups are the identity; a merged expert is the frequency-weighted (or uniform)
  average of its group and takes its dominant expert's router row; the groups are the average-linkage clusters
  of the experts' mean outputs.
- Bad arguments raise ValueError naming them, and leave the model as it was.
"""
import copy
import logging
import math
import pickle

import pytest
import torch
from torch import nn

import moefy
from conftest import ResidualMLPNet
from moefy import MoEBlock
from moefy.compress import SCORE_METHODS, cluster_experts, expert_scores, merge_experts, prune_experts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread

E, K = 8, 2


def moefied(dtype=torch.float64, **options):
    """ResidualMLPNet (x (B, L, 8) -> (B, L, 4)) with both MLPs as mixtures of E distinct experts."""
    torch.manual_seed(0)
    return moefy.moefy(ResidualMLPNet().to(dtype), num_experts=E, k=K, target="blocks.*", expert_noise=0.5,
                       **options).eval()


def batches(n=3, shape=(2, 6), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, 8, generator=g, dtype=dtype) for _ in range(n)]


def run(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def outputs(model, data):
    with torch.no_grad():
        outs = [run(model, b) for b in data]
    return torch.cat([getattr(o, "logits", o).flatten() for o in outs])


# ------------------------------------------------------------------------------------------- the brute force
def kept_slots(r, num_experts, config):
    """(T, k) bool: the token-choice slots of record ``r`` that ran on a real expert, decided here from the picks
    (``r.indices``), the finite tokens and the capacity rule C = min(T, ceil(factor · T · k / E)): per expert its
    earliest tokens (``"position"``) or its highest-probability ones, earlier tokens first on ties (``"probs"``)."""
    T, k = r.indices.shape
    finite = r.finite if r.finite is not None else torch.ones(T, dtype=torch.bool)
    slots = [(t, s, int(r.indices[t, s])) for t in range(T) for s in range(k)
             if finite[t] and int(r.indices[t, s]) < num_experts]
    keep = torch.zeros(T, k, dtype=torch.bool)
    factor = config.token_capacity_factor
    capacity = T * k if factor is None else min(T, math.ceil(factor * T * k / num_experts))
    for e in range(num_experts):
        mine = [(t, s) for t, s, c in slots if c == e]
        if config.drop_policy == "probs":
            mine.sort(key=lambda ts: (-float(r.probs[ts[0], e]), ts[0]))
        for t, s in mine[:capacity]:
            keep[t, s] = True
    return keep


def brute_force(model, data):
    """``{block name: sums}`` over ``data``, computed from each block's input and routing record: every expert
    run on every token; ``freq`` / ``soft`` / ``weighted`` (Σ g·‖f‖) / ``norm`` (Σ ‖f‖) per expert, the output sum
    over routed tokens (E, F_out), the routed tokens, and the slots sent to no real expert."""
    blocks = {n: b for n, b in model.named_modules() if isinstance(b, MoEBlock)}
    seen = {}

    def hook(name):
        def keep(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[name] = (x.detach(), module.routing)
        return keep

    handles = [b.register_forward_hook(hook(n), with_kwargs=True) for n, b in blocks.items()]
    sums = {n: dict({key: torch.zeros(b.num_experts, dtype=torch.float64) for key in ("freq", "soft", "weighted",
                                                                                        "norm")},
                    output_sum=0.0, tokens=0, elsewhere=0) for n, b in blocks.items()}
    try:
        model.eval()
        with torch.no_grad():
            for batch in data:
                seen.clear()
                run(model, batch)
                for name, block in blocks.items():
                    if name in seen:
                        _add(sums[name], block, *seen[name])
    finally:
        for h in handles:
            h.remove()
    return sums


def _add(s, block, x, r):
    n = block.num_experts
    rows = x.reshape(-1, block.input_dim)                                          # (T, D)
    outs = torch.stack([block.expert_forward(block.experts[e], rows).double().reshape(rows.shape[0], -1)
                        for e in range(n)])                                        # (E, T, F_out)
    norms = outs.norm(dim=-1)                                                      # (E, T)
    keep = kept_slots(r, n, block.config)
    finite = r.finite if r.finite is not None else torch.ones(rows.shape[0], dtype=torch.bool)
    for t in range(rows.shape[0]):
        if not finite[t]:
            continue
        s["tokens"] += 1
        s["soft"] += r.probs[t, :n].double()
        s["output_sum"] = s["output_sum"] + outs[:, t]
        for slot in range(r.indices.shape[1]):
            e = int(r.indices[t, slot])
            if e >= n:
                s["elsewhere"] += 1
            elif keep[t, slot]:
                s["freq"][e] += 1
                s["norm"][e] += norms[e, t]
                s["weighted"][e] += float(r.weights[t, slot]) * norms[e, t]


def brute_scores(s):
    reap = torch.where(s["freq"] > 0, s["weighted"] / s["freq"].clamp(min=1), torch.zeros(()).double())
    return {"frequency": s["freq"], "soft": s["soft"], "reap": reap, "ean": s["norm"]}


def assert_scores_match(model, data, rtol):
    sums = brute_force(model, data)
    for method in SCORE_METHODS:
        got = expert_scores(model, data, method)
        assert list(got) == list(sums)
        for name, s in sums.items():
            want = brute_scores(s)[method]
            assert got[name].dtype == torch.float64 and got[name].shape == want.shape
            torch.testing.assert_close(got[name], want, rtol=rtol, atol=0, msg=f"{method} {name}")
    return sums


# ------------------------------------------------------------------------------------------- scores
CASES = {
    "top2": dict(),
    "fused": dict(fused=True),
    "hole": dict(hole=True),
    "null_zero": dict(null_experts={"zero": 1}),
    "capacity_position": dict(token_capacity_factor=0.5, drop_policy="position"),
    "capacity_probs": dict(token_capacity_factor=0.5, drop_policy="probs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scores_equal_brute_force(case):
    model = moefied(**CASES[case])
    data = batches()
    sums = assert_scores_match(model, data, rtol=1e-10)
    slots = len(data) * 12 * K
    for name, s in sums.items():
        assert s["tokens"] == len(data) * 12 and s["freq"].shape == (E,)
        if case in ("hole", "null_zero"):  # some slots went to the extra column, counted in no expert
            assert s["elsewhere"] > 0 and s["freq"].sum() == slots - s["elsewhere"]
        elif case.startswith("capacity"):  # C = ceil(0.5 * 12 * 2 / 8) = 2 per expert and batch: some dropped
            assert s["freq"].max() <= 2 * len(data) and s["freq"].sum() < slots
        else:
            assert s["freq"].sum() == slots
    if case == "fused":
        assert all(b._fused is not None for b in moefy.moe_blocks(model))


def test_scores_skip_a_nan_token_and_do_not_change_the_others():
    model = moefied()
    x = batches(1)[0]
    x[1, 3, 2] = float("nan")
    without = torch.cat([x.reshape(12, 8)[:9], x.reshape(12, 8)[10:]]).reshape(1, 11, 8)  # token 1 * 6 + 3 out
    with torch.no_grad():
        model(x)
    assert [b.routing.num_nonfinite for b in moefy.moe_blocks(model)] == [1, 1]
    sums = assert_scores_match(model, [x], rtol=1e-10)
    assert all(s["tokens"] == 11 for s in sums.values())
    for method in SCORE_METHODS:
        got, want = expert_scores(model, [x], method), expert_scores(model, [without], method)
        for name in want:
            assert torch.isfinite(got[name]).all()
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0)
        if method == "frequency":
            assert all(float(s.sum()) == 11 * K for s in got.values())


def qwen3_moe(num_experts=8):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, num_experts_per_tok=2, intermediate_size=48,
                                      moe_intermediate_size=16, num_experts=num_experts, norm_topk_prob=True)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def token_batches(n=2, vocab=64):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, vocab, (2, 7), generator=g)} for _ in range(n)]


def test_scores_of_an_imported_qwen3_moe_equal_brute_force():
    model = moefy.hf.from_hf(qwen3_moe())
    sums = assert_scores_match(model, token_batches(), rtol=1e-5)
    assert len(sums) == 2 and all(float(s["freq"].sum()) == 2 * 14 * 2 for s in sums.values())


@pytest.mark.parametrize("model_type", ["gpt_oss", "ernie4_5_moe"])
def test_scores_of_a_family_routed_import_equal_brute_force(model_type):
    pytest.importorskip("transformers")
    from hf_moe_families import tiny_input_ids, tiny_model
    from moefy.hf.generic import HFExpertsBlock
    model = moefy.hf.from_hf(copy.deepcopy(tiny_model(model_type)))
    blocks = moefy.moe_blocks(model)
    assert blocks and all(isinstance(b, HFExpertsBlock) for b in blocks)
    data = [{"input_ids": tiny_input_ids(seed=s)} for s in (1, 2)]
    sums = assert_scores_match(model, data, rtol=1e-5)
    assert all(float(s["freq"].sum()) == 2 * 12 * b.k for s, b in zip(sums.values(), blocks))


# ------------------------------------------------------------------------------------------- pruning
REACHED = {"blocks.0": [0, 2, 5], "blocks.1": [1, 3, 4, 7]}


def only_reaching(model, reached=REACHED):
    """Channel 0 of the residual stream is the constant 5 (the embedding's bias; no expert writes it), and every
    expert outside ``reached`` has the router row -10 · e₀: logit -50, never in a token's top 2."""
    with torch.no_grad():
        model.emb.weight[0] = 0.0
        model.emb.bias[0] = 5.0
        for name in reached:
            block = model.get_submodule(name)
            for expert in block.experts:
                expert[2].weight[0] = 0.0
                expert[2].bias[0] = 0.0
            gate = block.router.gate.weight
            gate[:, 0] = 0.0
            for e in range(block.num_experts):
                if e not in reached[name]:
                    gate[e] = 0.0
                    gate[e, 0] = -10.0
    return model


@pytest.mark.parametrize("options", [{}, {"hole": True}, {"null_experts": {"zero": 1, "copy": 1}}],
                         ids=["top2", "hole", "null_experts"])
def test_pruning_unreached_experts_keeps_the_outputs_and_gives_an_ordinary_block(tmp_path, options):
    model = only_reaching(moefied(**options))
    extra = int(options.get("hole", False)) + sum(options.get("null_experts", {}).values())  # columns after E
    data = batches()
    before = outputs(model, data)
    gates = {n: model.get_submodule(n).router.gate.weight.detach().clone() for n in REACHED}
    experts = {n: [copy.deepcopy(e.state_dict()) for e in model.get_submodule(n).experts] for n in REACHED}
    scores = expert_scores(model, data, "frequency")
    for name, ids in REACHED.items():
        assert (scores[name][ids] > 0).all() and scores[name].sum() == scores[name][ids].sum()
        slots = 3 * 12 * K
        assert scores[name].sum() < slots if extra else scores[name].sum() == slots  # extra columns take some

    kept = prune_experts(model, {n: len(ids) for n, ids in REACHED.items()}, scores)
    assert kept == REACHED
    torch.testing.assert_close(outputs(model, data), before, rtol=0, atol=1e-12)
    for name, ids in REACHED.items():
        block = model.get_submodule(name)
        columns = len(ids) + extra
        assert block.num_experts == len(block.experts) == len(ids) and block.num_columns == columns
        assert block.router.gate.weight.shape == (columns, 16) and block.router.gate.out_features == columns
        assert torch.equal(block.router.gate.weight, gates[name][ids + list(range(E, E + extra))])
        for i, old in enumerate(ids):
            assert block.experts[i].expert_id == i
            assert all(torch.equal(v, experts[name][old][k]) for k, v in block.experts[i].state_dict().items())
        with torch.no_grad():
            model(data[0])
        assert block.routing.probs.shape == (12, columns) and sum(block.routing.counts) == 12 * K

    # copies and a checkpoint keep the pruned model
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(outputs(copied, data), outputs(model, data))
    moefy.save(model, tmp_path)
    torch.manual_seed(5)
    loaded = moefy.load(ResidualMLPNet().double(), tmp_path)
    assert [b.num_experts for b in moefy.moe_blocks(loaded)] == [3, 4]
    assert torch.equal(outputs(loaded, data), outputs(model, data))

    # and trains: the loss reaches every router row of a kept expert and every kept expert
    model.train()
    (model(data[0]).square().mean()).backward()
    for name, ids in REACHED.items():
        block = model.get_submodule(name)
        assert (block.router.gate.weight.grad[:len(ids)].abs().sum(1) > 0).all()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for e in block.experts for p in e.parameters())


def test_groups_and_selection_bias_follow_the_kept_experts():
    model = moefied(score_func="sigmoid", selection_bias=True, n_group=2, topk_group=1)
    with torch.no_grad():
        for b in moefy.moe_blocks(model):
            b.router.score_correction_bias.copy_(torch.randn(E, dtype=b.router.score_correction_bias.dtype) * 0.3)
    old = {n: copy.deepcopy(model.get_submodule(n).router) for n in ("blocks.0", "blocks.1")}
    scores = {"blocks.0": torch.tensor([5., 1, 3, 2, 0, 9, 4, 4]),   # group 0: 5, 3 -> 0, 2; group 1: 9, tie 4 -> 5, 6
              "blocks.1": torch.tensor([1., 1, 1, 1, 2, 2, 2, 2])}   # ties: the lower indices of each group
    kept = prune_experts(model, 4, scores)
    assert kept == {"blocks.0": [0, 2, 5, 6], "blocks.1": [0, 1, 4, 5]}
    x = batches(1)[0]
    for name, ids in kept.items():
        block, router = model.get_submodule(name), old[name]
        assert block.num_experts == 4 and block.config.n_group == 2
        assert torch.equal(block.router.score_correction_bias, router.score_correction_bias[ids])
        assert torch.equal(block.router.gate.weight, router.gate.weight[ids])
        # the routing by hand from the old router's kept rows: DeepSeek-V3 groups of 2, the better biased group
        with torch.no_grad():
            rows = block_input(model, name, x)
        r = block.routing
        with torch.no_grad():
            probs = torch.sigmoid(rows @ router.gate.weight[ids].double().T)          # (T, 4), float64 math
        biased = probs + router.score_correction_bias[ids].double()
        group = (biased[:, 2:].sum(1) > biased[:, :2].sum(1)).long()                  # (T,)
        assert torch.equal(r.indices.sort(1).values, torch.stack([2 * group, 2 * group + 1], 1))
        want = probs.gather(1, r.indices)
        torch.testing.assert_close(r.weights, want / want.sum(1, keepdim=True), rtol=1e-12, atol=0)


def block_input(model, name, x):
    got = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: got.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return got[0].reshape(-1, 16)


@pytest.mark.parametrize("keep, want", [
    (0.75, [0, 1, 2, 4, 5, 7]),          # round(0.75 * 8) = 6; the tie 3.0 (experts 0, 4) keeps both
    (0.5, [1, 2, 5, 7]),                 # 4 of 8
    (1.0, list(range(8))),
    (3, [1, 5, 7]),                      # the tie 4.0 (experts 1, 2): the lower index
    ([5, 5], [0, 1, 2, 5, 7]),           # the tie 3.0 (experts 0, 4): the lower index
    ({"blocks.0": 2, "blocks.1": 2}, [5, 7]),
])
def test_prune_by_fraction_count_list_and_dict(keep, want):
    model = moefied()
    scores = {"blocks.0": torch.tensor([3.0, 4.0, 4.0, 1.0, 3.0, 6.0, 0.5, 5.0]),
              "blocks.1": torch.arange(8.0).flip(0)}                 # no ties: the first len(want) experts
    kept = prune_experts(model, keep, scores)
    assert kept == {"blocks.0": want, "blocks.1": list(range(len(want)))}
    assert [b.num_experts for b in moefy.moe_blocks(model)] == [len(want)] * 2


def test_a_pruned_qwen3_moe_gives_transformers_logits_with_the_kept_experts():
    """Reference: transformers' own Qwen3-MoE with E=4, its stacked experts and router rows those kept."""
    hf = qwen3_moe()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    model = moefy.hf.from_hf(hf)
    scores = {name: torch.randn(8, generator=torch.Generator().manual_seed(i)) for i, name in
              enumerate(n for n, m in model.named_modules() if isinstance(m, MoEBlock))}
    kept = prune_experts(model, 4, scores)
    assert model.config.num_experts == 4
    assert all(ids == sorted(torch.argsort(scores[n], descending=True)[:4].tolist()) for n, ids in kept.items())
    for name, ids in kept.items():
        for key in list(state):
            if key.startswith(name + ".experts.") or key == name + ".gate.weight":
                state[key] = state[key][ids]
    reference = qwen3_moe(num_experts=4)
    reference.load_state_dict(state)
    data = token_batches()
    torch.testing.assert_close(outputs(model, data), outputs(reference, data), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("options", [{}, {"fused": True}, {"hole": True}], ids=["top2", "fused", "hole"])
def test_merging_into_singletons_is_the_identity(options):
    model = moefied(**options)
    data = batches()
    before, state = outputs(model, data), copy.deepcopy(model.state_dict())
    groups = merge_experts(model, E, expert_scores(model, data, "reap"), data)
    assert groups == {n: [[e] for e in range(E)] for n in ("blocks.0", "blocks.1")}
    assert torch.equal(outputs(model, data), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["frequency_weighted", "average"])
def test_a_merged_expert_is_the_weighted_average_of_its_group(method):
    model = moefied()
    data = batches()
    sums = brute_force(model, data)
    scores = expert_scores(model, data, "reap")
    old = {n: (copy.deepcopy(list(model.get_submodule(n).experts)), model.get_submodule(n).router.gate.weight
               .detach().clone()) for n in sums}
    groups = merge_experts(model, 3, scores, data, method=method)
    for name, s in sums.items():
        # HC-SMoE's groups: average linkage of the experts' mean outputs over the routed tokens
        assert groups[name] == cluster_experts(s["output_sum"] / s["tokens"], 3)
        assert sorted(e for g in groups[name] for e in g) == list(range(E)) and len(groups[name]) == 3
        assert max(len(g) for g in groups[name]) > 1
        block, (experts, gate) = model.get_submodule(name), old[name]
        assert block.num_experts == len(block.experts) == 3 and block.router.gate.weight.shape == (3, 16)
        for i, group in enumerate(groups[name]):
            dominant = max(group, key=lambda e: (float(scores[name][e]), -e))
            assert torch.equal(block.router.gate.weight[i], gate[dominant])
            freq = s["freq"][group]
            weights = freq / freq.sum() if method == "frequency_weighted" else \
                torch.full((len(group),), 1 / len(group), dtype=torch.float64)
            merged = dict(block.experts[i].named_parameters())
            for pname, p in merged.items():
                want = sum(float(w) * dict(experts[e].named_parameters())[pname].double()
                           for w, e in zip(weights, group))
                torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-15, msg=f"{name} {group} {pname}")
    outputs(model, data)  # the merged model runs


def test_merging_an_imported_qwen3_moe_sets_its_expert_count():
    model = moefy.hf.from_hf(qwen3_moe())
    data = token_batches()
    sums = brute_force(model, data)
    groups = merge_experts(model, 4, expert_scores(model, data, "frequency"), data)
    assert model.config.num_experts == 4
    for name, s in sums.items():
        assert groups[name] == cluster_experts(s["output_sum"] / s["tokens"], 4)
        assert model.get_submodule(name).router.gate.weight.shape == (4, 32)
    assert outputs(model, data).isfinite().all()


def test_cluster_experts_by_hand():
    pairs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [10.0, 0.2]])
    assert cluster_experts(pairs, 2) == [[0, 2], [1, 3]]
    assert cluster_experts(pairs, 4) == [[0], [1], [2], [3]]
    assert cluster_experts(pairs, 1) == [[0, 1, 2, 3]]
    # average linkage: after {0, 1} (distance 2), d({0,1}, 2) = (4.6 + 2.6) / 2 = 3.6 > d(2, 3) = 3.4 (single
    # linkage would join 2 to {0, 1} at 2.6)
    line = torch.tensor([[0.0], [2.0], [4.6], [8.0]])
    assert cluster_experts(line, 2) == [[0, 1], [2, 3]]
    # with groups: clusters stay inside each half, whatever the distances
    assert cluster_experts(pairs, 2, n_group=2) == [[0, 1], [2, 3]]


# ------------------------------------------------------------------------------------------- errors
class FirstBlocks(torch.nn.Module):
    """A moefied ResidualMLPNet whose forward runs only its first ``depth`` blocks: x (B, L, 8) -> (B, L, 4)."""

    def __init__(self, **options):
        super().__init__()
        self.net = moefied(**options)

    def forward(self, x, depth=2):
        h = self.net.emb(x)
        for block in self.net.blocks[:depth]:
            h = h + block(h)
        return self.net.head(h)


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state):
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


S = torch.arange(8.0)
BAD_PRUNES = {
    "keep > E": (9, r"keep=9 for blocks.0: must be in \[2, 8\]"),
    "keep < k": (1, r"keep=1 for blocks.0: must be in \[2, 8\] \(its k=2 experts per token"),
    "keep 0": (0, r"keep=0 for blocks.0: must be in \[2, 8\]"),
    "fraction below k": (0.1, r"keep=1 for blocks.0: must be in \[2, 8\]"),
    "fraction 0": (0.0, r"keep=0.0: a fraction of each block's experts must be in \(0, 1\]"),
    "fraction 1.5": (1.5, r"keep=1.5: a fraction of each block's experts must be in \(0, 1\]"),
    "short list": ([4], r"keep: 1 counts for 2 MoE blocks"),
    "dict without a block": ({"blocks.0": 4}, r"keep: a dict needs one count per MoE block; missing \['blocks.1'\]"),
    "scores of a missing block": (4, r"no scores for blocks \['blocks.1'\]", {"blocks.0": S}),
    "scores of another block": (4, r"scores for \['blocks.9'\], which are not MoE blocks",
                                {"blocks.0": S, "blocks.1": S, "blocks.9": S}),
    "scores of the wrong shape": (4, r"scores\['blocks.0'\] has shape \(7,\) .* a real vector of shape \(8,\)",
                                  {"blocks.0": S[:7], "blocks.1": S}),
    "non-finite scores": (4, r"scores\['blocks.1'\] has non-finite values",
                          {"blocks.0": S, "blocks.1": torch.tensor([0, 1, 2, float("nan"), 4, 5, 6, 7.])}),
}


@pytest.mark.parametrize("case", list(BAD_PRUNES))
def test_bad_prunes_and_merges_raise_and_change_nothing(case):
    keep, match, *scores = BAD_PRUNES[case]
    scores = scores[0] if scores else {"blocks.0": S, "blocks.1": S}
    model = moefied()
    state = state_of(model)
    with pytest.raises(ValueError, match=match):
        prune_experts(model, keep, scores)
    with pytest.raises(ValueError, match=match):
        merge_experts(model, keep, scores, batches(1))
    assert_unchanged(model, state)
    assert [b.num_experts for b in moefy.moe_blocks(model)] == [E, E]


GROUPED = dict(score_func="sigmoid", selection_bias=True, n_group=2, topk_group=1)


@pytest.mark.parametrize("keep, match", [
    (3, r"keep=3 for blocks.0: its router picks in n_group=2 groups .* keep a multiple of 2"),
    (2, r"keep=2 for blocks.0: .*k=2 must fit in the kept groups"),                      # groups of one expert
    ({"blocks.0": 4, "blocks.1": 2}, r"keep=2 for blocks.1: .*k=2 must fit in the kept groups"),  # after blocks.0
])
def test_grouped_keeps_that_do_not_fit_change_nothing(keep, match):
    model = moefied(**GROUPED)
    state = state_of(model)
    for compress in (lambda: prune_experts(model, keep, {"blocks.0": S, "blocks.1": S}),
                     lambda: merge_experts(model, keep, {"blocks.0": S, "blocks.1": S}, batches(1))):
        with pytest.raises(ValueError, match=match):
            compress()
        assert_unchanged(model, state)
        assert [b.num_experts for b in moefy.moe_blocks(model)] == [E, E]


def test_data_and_methods_that_cannot_score_are_named():
    model = FirstBlocks()
    x = batches(1)[0]
    state = state_of(model)
    scores = {"net.blocks.0": S, "net.blocks.1": S}
    with pytest.raises(ValueError, match=r"data: 1 batches reached no MoE block of the model \(blocks: "
                                         r"\['net.blocks.0', 'net.blocks.1'\]\)"):
        expert_scores(model, [(x, 0)], "frequency")
    with pytest.raises(ValueError, match=r"data: no batch to calibrate on \(an empty iterable\)"):
        expert_scores(model, [], "frequency")
    with pytest.raises(TypeError, match=r"data must be an iterable of model inputs .* data=\[batch\]"):
        expert_scores(model, x, "frequency")
    with pytest.raises(ValueError, match=r"method must be one of \('frequency', 'soft', 'reap', 'ean'\), got 'l2'"):
        expert_scores(model, [x], "l2")
    with pytest.raises(ValueError, match=r"model: ResidualMLPNet has no MoE block"):
        expert_scores(ResidualMLPNet(), [x], "frequency")
    # a block that the data does not reach scores zero; merging needs its outputs
    half = expert_scores(model, [(x, 1)], "frequency")
    assert float(half["net.blocks.0"].sum()) == 12 * K and torch.equal(half["net.blocks.1"], torch.zeros(E).double())
    with pytest.raises(ValueError, match=r"data reached no token of blocks \['net.blocks.1'\]: merging clusters"):
        merge_experts(model, 4, scores, [(x, 1)])
    with pytest.raises(ValueError, match=r"method must be one of \('frequency_weighted', 'average'\), got 'mean'"):
        merge_experts(model, 4, scores, [x], method="mean")
    assert_unchanged(model, state)


def test_a_family_routed_block_with_null_experts_refuses_prune_and_merge():
    pytest.importorskip("transformers")
    from hf_moe_families import tiny_input_ids, tiny_model
    model = moefy.hf.from_hf(copy.deepcopy(tiny_model("longcat_flash")))
    data = [{"input_ids": tiny_input_ids()}]
    scores = expert_scores(model, data, "reap")
    state = state_of(model)
    match = (r"model.layers.0.mlp.experts: LongcatFlashMoE routes to null experts \(longcat zero experts\) that its "
             r"router adds after the real ones; prune / merge do not resize it")
    with pytest.raises(ValueError, match=match):
        prune_experts(model, 4, scores)
    with pytest.raises(ValueError, match=match):
        merge_experts(model, 4, scores, data)
    assert_unchanged(model, state)


class _OwnDispatch(MoEBlock):
    """A block whose dispatch override computes its experts without the execution seam."""

    def expert_forward(self, expert, x):
        return expert(x)

    def dispatch(self, rows, routing, run_expert=None):
        return torch.zeros_like(rows)


def test_experts_run_outside_the_seam_are_refused_not_scored_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _OwnDispatch([nn.Linear(4, 4) for _ in range(4)], 4, k=2))
    with pytest.raises(ValueError, match=r"_OwnDispatch.dispatch runs its experts without moefy's execution seam"):
        expert_scores(model, [torch.randn(3, 4)], "frequency")
    assert "dispatch" not in model[1].__dict__ and "_execution" not in model[1].__dict__  # the observers are gone


def test_a_block_the_data_does_not_reach_is_named_in_a_warning(caplog):
    model = FirstBlocks()
    with caplog.at_level(logging.WARNING, logger="moefy.compress"):
        expert_scores(model, [(batches(1)[0], 1)], "frequency")
    assert "the calibration data reached no token of blocks ['net.blocks.1']: their experts score 0" in caplog.text


def test_a_replay_recorded_before_pruning_is_refused_not_mapped_onto_other_experts():
    """Column j of a pruned block is another expert than when the replay recorded: replaying would silently send
    tokens to the wrong experts."""
    from moefy.routing import RouterReplay
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), moefy.moefy(nn.Linear(4, 4), num_experts=6, k=2))
    x = torch.randn(5, 4)
    replay = RouterReplay(model)
    with replay.record():
        model(x)
    prune_experts(model, 4, {"1": torch.arange(6.0)})
    with pytest.raises(ValueError, match=r"recorded over 6 router columns, the block now has 4 \(resized since"):
        with replay.replay():
            model(x)


def test_reap_weighs_by_what_combine_applies_with_mean_aggregation():
    """aggregation="mean" divides each combine weight by the token's number of experts (here always k=2): REAP's
    g_j(x) is that weight, so its scores are half the same mixture's with "sum"; the other scores are equal."""
    def net(aggregation):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), moefy.moefy(nn.Linear(4, 4), num_experts=6, k=2, expert_noise=0.5,
                                                          aggregation=aggregation))
    data = [torch.randn(7, 4)]
    for method in SCORE_METHODS:
        summed, mean = expert_scores(net("sum"), data, method)["1"], expert_scores(net("mean"), data, method)["1"]
        torch.testing.assert_close(mean, summed / 2 if method == "reap" else summed, rtol=1e-12, atol=0)
