"""moefy.compress on family-routed blocks (moefy.hf.generic.HFExpertsBlock: the family's own router kept): every
text MoE family of transformers pruned, merged and exported, checked against transformers' own models.

- Every family ``from_hf`` imports (the RoutingConfig families with ``keep_router=True``), pruned and merged: the
  logits equal those of transformers' own class of the family built from its config with the kept expert count,
  holding the original weights with every tensor whose shape that config changes sliced here to the kept experts
  (by key and shape: the dimension that changed is the experts'); for merging, each expert tensor's row is the
  frequency-weighted average of its group, computed here. The kept experts are odd-indexed (not a prefix), more
  than k (the selection biases, random, decide picks), the config's count is the kept number, and the family's
  router-logit aux loss (``output_router_logits=True``, where it has one) equals the reference's. Families moefy
  refuses to resize are listed (:data:`REFUSED`) with the refusal message asserted and the model unchanged;
  52 of the 62 families prune and merge (3 not imported, 7 refused).
- Export of GPT-OSS, GLM-4-MoE, ERNIE-4.5 and PhiMoE, pruned and merged: ``from_pretrained`` of the folder has
  the smaller config, the compressed model's logits, and the original's weights with the kept rows.
- Merging: each merged row of every stacked expert tensor is the frequency-weighted (or uniform) average of its
  group, with frequencies from ``expert_scores(..., "frequency")``; the router keeps the dominant expert's rows
  (ERNIE-4.5's (1, E) statistics: its column); merging into E groups changes no bit.
- Refusals, named: null experts, experts called one by one, uneven counts, k that does not fit the kept groups,
  and a router that routes with something the slicing cannot see (the check on copies catches it, nothing
  changes).
Tiny random models of tests/hf_moe_families.py (hidden 32, 2 layers, 8 experts), no download.
"""
import copy
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="moefy.hf needs the transformers package")
import moefy  # noqa: E402
from hf_moe_families import families, tiny_config, tiny_input_ids, tiny_model  # noqa: E402
from moefy.compress import expert_scores, merge_experts, prune_experts  # noqa: E402
from moefy.compress.calibrate import named_blocks  # noqa: E402
from moefy.hf.families import FAMILIES as MAPPED  # noqa: E402
from moefy.hf.generic import HFExpertsBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# a transformers config's fields for the number of routed experts (read here, not from moefy)
COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token")

# from_hf refuses these (no experts(hidden_states, top_k_index, top_k_weights) call to replace)
NOT_IMPORTED = {
    "doge": "Doge's CDMoE experts are product-key embedding lookups",
    "jetmoe": "JetMoE's experts take the router's sorted token lists",
    "llama4_text": "Llama 4 scales each expert's input by its router score",
}
# prune / merge refuse these, by name (every layer checked before any changes)
REFUSED = {
    "longcat_flash": r"model.layers.0.mlp.experts: LongcatFlashMoE routes to null experts \(longcat zero experts\) "
                     r"that its router adds after the real ones; prune / merge do not resize it",
    "zaya": r"model.layers.0.mlp.experts: ZayaSparseMoeBlock routes to null experts \(zaya skip expert\)",
    "dbrx": r"transformer.blocks.0.ffn.experts: DbrxFFN's experts are called one by one \(not stacked weights",
    "ergo": r"model.layers.1.mlp.experts: ErgoMoE's experts are called one by one",
    # InklingTopkRouter keeps its gate elsewhere: no (E, D) parameter to slice
    "inkling_text": r"its router InklingTopkRouter has 0 parameters of shape \(8, 32\); moefy slices a router with "
                    r"one \(E, D\) gate weight",
    # the family's "MoE block" is the whole decoder layer (it needs position embeddings, the check cannot call it)
    "gemma4_text": r"model.layers.0.experts: Gemma4TextDecoderLayer could not be checked after removing experts "
                   r"\(TypeError",
    # layer 0 routes by a hash of the token ids (no top-k over router logits to restrict)
    "deepseek_v4": r"model.layers.0.mlp.experts: DeepseekV4SparseMoeBlock could not be checked after removing "
                   r"experts",
}
# picked in 1 of 2 groups of 4 with k=4: keeping 4 experts (2 a group) cannot fit k; the reference is the same
# family with k=2 (the refusal itself: test_k_that_does_not_fit_the_kept_groups_is_refused)
GROUP_LIMITED_K4 = ("axk1", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32")

_MODELS = {}


def original(model_type):
    """The tiny transformers model of ``model_type`` (not to be changed): k=2 for :data:`GROUP_LIMITED_K4`, and
    every constant bias (selection biases, GPT-OSS's router bias, ERNIE-4.5's statistics: zeros at init) random,
    so that a bias sliced wrong changes the outputs."""
    if model_type not in _MODELS:
        base = tiny_model(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model_type in GROUP_LIMITED_K4:
                cfg = tiny_config(model_type)
                for field in TOP_K_FIELDS:
                    if hasattr(cfg, field):
                        setattr(cfg, field, 2)
                torch.manual_seed(0)
                base = type(base)(cfg).eval()
            else:
                base = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(zlib.crc32(model_type.encode()))
        with torch.no_grad():
            for key, t in base.state_dict().items():
                if ("bias" in key or "statics" in key) and t.is_floating_point() and t.numel() > 1 and \
                        bool((t == t.flatten()[0]).all()):
                    t.copy_(0.05 * torch.randn(t.shape, generator=gen))  # as large as the router's spread
        _MODELS[model_type] = base
    return _MODELS[model_type]


def imported(model_type, base=None):
    """A family-routed moefy import of a copy of ``base`` (default :func:`original`)."""
    model = copy.deepcopy(base if base is not None else original(model_type))
    return moefy.hf.from_hf(model, keep_router=True if model_type in MAPPED else None)


IDS = tiny_input_ids(2, 16)  # 32 tokens: enough that a selection bias sliced wrong changes some token's picks
DATA = [{"input_ids": tiny_input_ids(seed=s)} for s in (1, 2)]  # calibration


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_router_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, output_router_logits=True)


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state):
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def odd_first(E, keep):
    """Scores (E,) whose ``keep`` highest are the odd-indexed experts first (2 in each group of 4), then even."""
    order = list(range(1, E, 2)) + list(range(0, E, 2))
    scores = torch.zeros(E, dtype=torch.float64)
    for rank, i in enumerate(order):
        scores[i] = E - rank
    return scores, sorted(order[:keep])


def count_fields(config, E):
    return [f for f in COUNT_FIELDS if getattr(config, f, None) == E and not isinstance(getattr(config, f), bool)]


def reference(base, E, ids, merged=None):
    """transformers' own class of ``base`` (E experts) built with E₂ experts, holding ``base``'s weights with every
    tensor whose shape the smaller config changes sliced to the kept experts along the one dimension that changed
    (E). ``ids``: the kept experts (E₂ of them), or ``{MoE layer prefix: kept experts}``, one list per layer.
    ``merged``: ``{MoE layer prefix: (groups, weights)}``: row j of every expert tensor (a key with ".experts.")
    is Σ_i weights[j][i] · row groups[j][i] instead (computed in float64). Returns the model and the keys sliced."""
    per_layer = ids if isinstance(ids, dict) else {"": ids}
    E2 = len(next(iter(per_layer.values())))
    cfg = copy.deepcopy(base.config)
    for field in count_fields(cfg, E):
        setattr(cfg, field, E2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = type(base)(cfg).eval()
    source = base.state_dict()
    weights, sliced = {}, []
    for key, want in ref.state_dict().items():
        have = source[key]
        changed = [d for d in range(have.dim()) if have.shape[d] != want.shape[d]]
        if not changed:
            weights[key] = have
            continue
        assert len(changed) == 1 and have.shape[changed[0]] == E and want.shape[changed[0]] == E2, key
        (prefix,) = [prefix for prefix in per_layer if key.startswith(prefix)]
        weights[key] = have.index_select(changed[0], torch.tensor(per_layer[prefix]))
        if merged and ".experts." in key:
            rows = have.double().movedim(changed[0], 0)
            average = torch.stack([sum(float(w) * rows[i] for w, i in zip(ws, group))
                                   for group, ws in zip(*merged[prefix])])
            weights[key] = average.movedim(0, changed[0]).to(have.dtype)
        sliced.append(key)
    ref.load_state_dict(weights, strict=True)
    return ref, sliced


# --------------------------------------------------------------------------------- every family
def frequency_weights(frequency, groups):
    """Each group's merge weights: its experts' frequencies normalised (uniform where none was routed)."""
    return [(f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / len(f))).tolist()
            for f in (frequency[g] for g in groups)]


@pytest.mark.parametrize("how", ["prune", "merge"])
@pytest.mark.parametrize("model_type", sorted(families()))
def test_compressed_family_routed_model_equals_transformers_own_with_the_kept_experts(model_type, how):
    if model_type in NOT_IMPORTED:
        with pytest.raises(ValueError, match=NOT_IMPORTED[model_type]):
            moefy.hf.from_hf(copy.deepcopy(tiny_model(model_type)))
        pytest.skip(f"from_hf does not import {model_type}: {NOT_IMPORTED[model_type]}")
    base = original(model_type)
    model = imported(model_type)
    blocks = named_blocks(model)
    assert blocks and all(isinstance(b, HFExpertsBlock) for b in blocks.values())
    E = next(iter(blocks.values())).num_experts
    k = max(math.ceil(b.k) for b in blocks.values())
    keep = min(E - 1, max(E // 2, k + 2))  # more than k: the kept selection biases decide the picks
    scores, ids = odd_first(E, keep)
    scores = {name: scores for name in blocks}
    compress = (lambda: prune_experts(model, keep, scores)) if how == "prune" else \
        (lambda: merge_experts(model, keep, scores, DATA))
    if model_type in REFUSED:
        state = state_of(model)
        with pytest.raises(ValueError, match=REFUSED[model_type]):
            compress()
        assert_unchanged(model, state)
        return
    fields = count_fields(base.config, E)
    assert fields
    if how == "prune":
        assert compress() == {name: ids for name in blocks} and ids != list(range(keep))
        ref, sliced = reference(base, E, ids)
    else:
        frequency = expert_scores(model, DATA, "frequency")
        groups = compress()
        prefixes = {name: name.rsplit(".", 1)[0] + "." for name in blocks}  # the family's MoE block
        dominants = {prefixes[n]: [max(g, key=lambda i: float(scores[n][i])) for g in groups[n]] for n in blocks}
        merged = {prefixes[n]: (groups[n], frequency_weights(frequency[n], groups[n])) for n in blocks}
        assert all(any(len(g) > 1 for g in groups[n]) for n in blocks)  # experts were merged
        ref, sliced = reference(base, E, dominants, merged)
    assert all(b.num_experts == keep for b in blocks.values())
    assert [getattr(model.config, f) for f in fields] == [keep] * len(fields)
    assert sliced  # the router's and the experts' tensors at least
    got, want = with_router_logits(model), with_router_logits(ref)
    assert (got.logits - logits(base)).abs().max() > 1e-4  # the compression changed the model: not a moot equality
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    aux = getattr(want, "aux_loss", None)  # the family's router-logit aux loss (over its model's num_experts)
    assert (getattr(got, "aux_loss", None) is None) == (aux is None)
    if aux is not None:
        torch.testing.assert_close(got.aux_loss, aux, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- export round trip
def reload(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


EXPORTED = ["gpt_oss", "glm4_moe", "ernie4_5_moe", "phimoe"]


@pytest.mark.parametrize("how", ["prune", "merge"])
@pytest.mark.parametrize("model_type", EXPORTED)
def test_compressed_family_routed_model_exports_as_its_class_with_fewer_experts(model_type, how, tmp_path):
    base = original(model_type)
    model = imported(model_type)
    blocks = named_blocks(model)
    E = next(iter(blocks.values())).num_experts
    keep = max(E // 2, max(math.ceil(b.k) for b in blocks.values()))
    scores, ids = odd_first(E, keep)
    scores = {name: scores for name in blocks}
    if how == "prune":
        groups = {name: [[i] for i in ids] for name in blocks}
        prune_experts(model, keep, scores)
    else:
        groups = merge_experts(model, keep, scores, DATA)
    # the rows each block kept: its experts (prune), each group's highest-scoring expert (merge)
    kept = {name.rsplit(".", 1)[0] + ".": [max(g, key=lambda i: float(scores[name][i])) for g in groups[name]]
            for name in blocks}  # {the family's MoE block "model.layers.0.mlp.": rows}
    after = logits(model)

    loaded = reload(moefy.hf.export(model, tmp_path))
    assert type(loaded) is type(base)
    fields = count_fields(base.config, E)
    assert fields and [getattr(loaded.config, f) for f in fields] == [keep] * len(fields)
    torch.testing.assert_close(logits(loaded), after, atol=1e-5, rtol=0)

    # every weight is the original's, the experts' and routers' rows those kept; merged rows: the experts' only
    ref, sliced = reference(base, E, kept)
    want, got = ref.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    merged = {prefix: [j for j, g in enumerate(groups[name]) if len(g) > 1] for prefix, name in zip(kept, blocks)}
    assert (how == "merge") == any(merged.values())
    for key in want:
        if ".experts." in key and key in sliced:  # a stacked expert tensor: unmerged rows kept as they were
            (rest,) = [[j for j in range(keep) if j not in m] for prefix, m in merged.items() if key.startswith(prefix)]
            assert torch.equal(got[key][rest], want[key][rest]), key
        else:
            assert torch.equal(got[key], want[key]), key


# --------------------------------------------------------------------------------- merging
def stacked(block):
    """{name: (E, ...) float64 copy} of the family experts module's stacked tensors and its router's E-row ones."""
    E = block.num_experts
    experts = {n: t.detach().double().clone() for n, t in block.hf_experts.state_dict().items() if t.shape[0] == E}
    router = {n: t.detach().clone() for n, t in block._family_router.state_dict().items()
              if t.dim() and E in t.shape[:2]}
    return experts, router


@pytest.mark.parametrize("method", ["frequency_weighted", "average"])
@pytest.mark.parametrize("model_type", ["gpt_oss", "ernie4_5_moe"])
def test_merged_family_rows_are_the_weighted_average_of_their_group(model_type, method):
    model = imported(model_type)
    blocks = named_blocks(model)
    frequency = expert_scores(model, DATA, "frequency")
    before = {name: stacked(b) for name, b in blocks.items()}
    scores = {name: torch.tensor([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]) for name in blocks}  # distinct
    groups = merge_experts(model, 4, scores, DATA, method=method)
    weighted = 0
    for name, block in blocks.items():
        assert sorted(i for g in groups[name] for i in g) == list(range(8)) and len(groups[name]) == 4
        assert block.num_experts == 4 and any(len(g) > 1 for g in groups[name])
        experts, router = stacked(block)
        old_experts, old_router = before[name]
        assert sorted(experts) == sorted(old_experts) and sorted(router) == sorted(old_router) and router
        for j, group in enumerate(groups[name]):
            f = frequency[name][group]
            w = f / f.sum() if method == "frequency_weighted" and f.sum() > 0 else torch.full_like(f, 1 / len(f))
            weighted += len(group) > 1 and len(set(f.tolist())) > 1
            dominant = max(group, key=lambda i: float(scores[name][i]))
            for key, rows in old_experts.items():
                want = sum(float(wi) * rows[i] for wi, i in zip(w, group)).float()
                torch.testing.assert_close(experts[key][j].float(), want, atol=1e-6, rtol=1e-6)
            for key, t in old_router.items():  # the router is not re-fitted: the dominant expert's row
                column = t.dim() == 2 and t.shape[0] == 1  # ERNIE-4.5's (1, E) statistics
                assert torch.equal(router[key][..., j] if column else router[key][j],
                                   t[..., dominant] if column else t[dominant]), key
    assert weighted  # some group's frequencies differ: the frequency weighting is tested, not only the mean
    assert getattr(model.config, count_fields(original(model_type).config, 8)[0]) == 4


def test_merging_into_singletons_changes_no_bit():
    model = imported("gpt_oss")
    blocks = named_blocks(model)
    state, before, config = state_of(model), logits(model), model.config.to_dict()
    scores = {name: odd_first(8, 4)[0] for name in blocks}
    groups = merge_experts(model, 8, scores, DATA)
    assert groups == {name: [[i] for i in range(8)] for name in blocks}
    assert_unchanged(model, state)
    assert torch.equal(logits(model), before) and model.config.to_dict() == config


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("model_type", ["longcat_flash", "dbrx"])
def test_null_experts_and_experts_called_one_by_one_are_refused_by_merge(model_type):
    model = imported(model_type)
    blocks = named_blocks(model)
    E = next(iter(blocks.values())).num_experts
    state = state_of(model)
    with pytest.raises(ValueError, match=REFUSED[model_type]):
        merge_experts(model, E // 2 + 1, {name: torch.rand(E) for name in blocks}, DATA)
    assert_unchanged(model, state)


@pytest.mark.parametrize("keep", [{"model.layers.0.mlp.experts": 4, "model.layers.1.mlp.experts": 6}, [4, 6]],
                         ids=["dict", "list"])
def test_family_routed_layers_must_keep_one_count(keep):
    model = imported("gpt_oss")
    blocks = named_blocks(model)
    state = state_of(model)
    match = (r"keep: family-routed blocks must keep the same number in every layer \(got \{'model.layers.0.mlp."
             r"experts': 4, 'model.layers.1.mlp.experts': 6\}\): their model's config has one expert count")
    with pytest.raises(ValueError, match=match):
        prune_experts(model, keep, {name: torch.rand(8) for name in blocks})
    with pytest.raises(ValueError, match=match):
        merge_experts(model, keep, {name: torch.rand(8) for name in blocks}, DATA)
    assert_unchanged(model, state)


@pytest.mark.parametrize("model_type", ["bailing_hybrid", "beam"])
def test_k_that_does_not_fit_the_kept_groups_is_refused(model_type):
    model = moefy.hf.from_hf(copy.deepcopy(tiny_model(model_type)))  # k=4 in 1 of 2 groups of 4
    state = state_of(model)
    match = (r"keep=4 for model.layers.1.mlp.experts: k=4 must fit in the kept groups: k <= topk_group \* E / "
             r"n_group = 1 \* 4 / 2")
    with pytest.raises(ValueError, match=match):
        prune_experts(model, 4, {"model.layers.1.mlp.experts": torch.rand(8)})
    assert_unchanged(model, state)
    prune_experts(model, 8, {"model.layers.1.mlp.experts": torch.rand(8)})  # all 8: k fits
    assert model.config.num_experts == 8


class FavouriteRouter(transformers.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter):
    """GPT-OSS's router that adds 10 to the logit of expert ``favourite``: a plain int the slicing cannot see."""

    favourite = 2

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight, self.bias)
        router_logits = router_logits.index_add(-1, torch.tensor([self.favourite]),
                                                torch.full((router_logits.shape[0], 1), 10.0))
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
        router_scores = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        return router_logits, router_scores, router_indices


class PriorRouter(transformers.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter):
    """GPT-OSS's router with an (E,) prior kept as a plain tensor attribute (not a parameter or buffer)."""

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight, self.bias) + self.prior
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
        router_scores = F.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        return router_logits, router_scores, router_indices


@pytest.mark.parametrize("router,match", [
    (FavouriteRouter, r"model.layers.0.mlp.experts: GptOssMLP with the kept experts does not route as its router "
                      r"restricted to them \(max \|difference\| .* on random tokens\); prune / merge refuse it"),
    (PriorRouter, r"model.layers.0.mlp.experts: GptOssMLP could not be checked after removing experts "
                  r"\(RuntimeError: The size of tensor a \(4\) must match the size of tensor b \(8\)")],
    ids=["int attribute", "tensor attribute"])
def test_a_router_the_slicing_misses_fails_the_check_and_nothing_changes(router, match):
    model = imported("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.__class__ = router
        layer.mlp.router.prior = 0.1 * torch.arange(8.0)
    blocks = named_blocks(model)
    before = logits(model)
    state = state_of(model)
    scores = {name: odd_first(8, 4)[0] for name in blocks}  # expert 2 removed; after slicing, index 2 is expert 5
    with pytest.raises(ValueError, match=match):
        prune_experts(model, 4, scores)
    with pytest.raises(ValueError, match=match):
        merge_experts(model, 4, scores, DATA)
    assert_unchanged(model, state)
    assert all(b.num_experts == 8 for b in blocks.values()) and model.config.num_local_experts == 8
    assert torch.equal(logits(model), before)


def test_families_that_prune_and_merge():
    """The count the README gives: every text MoE family of transformers 5.25 but those from_hf does not import and
    those prune / merge refuse (each tested above)."""
    assert set(NOT_IMPORTED) | set(REFUSED) | set(GROUP_LIMITED_K4) <= set(families())
    works = set(families()) - set(NOT_IMPORTED) - set(REFUSED)
    assert (len(families()), len(NOT_IMPORTED), len(REFUSED), len(works)) == (62, 3, 7, 52)


def test_a_model_in_training_mode_with_router_jitter_prunes():
    """The check runs its copies in eval mode: PhiMoE's training-time jitter (random per call) used to make the two
    copies differ, and the prune was refused."""
    model = imported("phimoe")
    for module in model.modules():
        if hasattr(module, "jitter_noise"):
            module.jitter_noise = 0.1
    model.train()
    kept = prune_experts(model, 6, expert_scores(model, [tiny_input_ids()], "reap"))
    assert model.training and all(len(ids) == 6 for ids in kept.values())
    assert model.config.num_local_experts == 6
