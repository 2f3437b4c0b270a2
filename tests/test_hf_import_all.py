"""moefy.hf.from_hf and moefy.hf.export on every MoE family transformers ships (tests/hf_moe_families.py).

For each family that builds here: the imported model's logits are within 1e-5 of transformers' (float32), greedy
``generate`` gives the same tokens, every block's record equals what the family's router picked (observed on the
unconverted model) and counts every slot once, ``moefy.aux_loss`` with ``aux_criterion={"switch": 0.01}`` equals
the Switch loss computed by hand from the family's router logits and reaches the family's router, and ``export``
writes the family's own class back: ``from_pretrained`` gives the very same weights and logits. The families
without an experts call moefy can replace are refused with the reason. Then the general path's own options on a
few families: replay, token_mask, a token-choice capacity, save_pretrained, copies, bad options.
"""
import copy
import math
import pickle

import pytest
import torch

import moefy

transformers = pytest.importorskip("transformers", reason="moefy.hf needs the transformers package")
from hf_moe_families import SKIPPED, families, tiny_input_ids, tiny_model  # noqa: E402

from moefy.hf import HFMoEBlock, export, from_hf  # noqa: E402
from moefy.hf.families import FAMILIES as MAPPED  # noqa: E402
from moefy.hf.generic import NOT_IMPORTED, HFExpertsBlock, family_state_dict  # noqa: E402
from moefy.observe.hf_routing import hf_moe_layers  # noqa: E402
from moefy.routing import RouterReplay  # noqa: E402

ALL = sorted(families())
# observe reader → the families moefy cannot import (each with its reason in NOT_IMPORTED)
REFUSED = {"llama4_text": "llama4", "jetmoe": "jetmoe", "doge": "doge"}
IMPORTED = [t for t in ALL if t not in REFUSED]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one intra-op thread


def original(model_type):
    """The family's tiny model as transformers builds it (shared with other test files: never changed here)."""
    if model_type in SKIPPED:
        pytest.skip(f"{model_type}: {SKIPPED[model_type]}")
    return tiny_model(model_type)


def observed_picks(model, ids):
    """What each MoE layer of the unconverted model routed: (indices, weights, logits) per layer, in order."""
    layers, _ = hf_moe_layers(model)
    seen = []
    handles = [layer.watch(lambda l: seen.append(l.routing)) for layer in layers]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def greedy(model, ids):
    """Three greedy tokens; the exception where transformers' generate fails on the tiny model itself
    (Inkling2-Loop: an embedding index out of range)."""
    try:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    except Exception as err:  # noqa: BLE001 - compared with what the imported model does
        return err


def same_generation(a, b) -> bool:
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return torch.equal(a, b)


def check_record(block, r, want, tokens):
    """``r``: the block's record; ``want``: the observed record of the same layer of the unconverted model."""
    k = block.k
    assert r.num_tokens == tokens and r.indices.shape == (tokens, k) and r.tokens_shape in ((2, 6), (tokens,))
    assert sum(r.counts[:block.num_experts]) + r.null_slots + int(r.dropped) == tokens * k
    assert r.count.tolist() == torch.bincount(r.indices.flatten(), minlength=block.num_columns).tolist()
    if isinstance(block, HFExpertsBlock):  # the family's picks, as it made them (from the layer's input, which
        # moefy computed for layers after the first: equal up to float rounding)
        assert torch.equal(r.indices, want.indices) and r.null_columns == want.null_columns
        torch.testing.assert_close(r.weights, want.weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(r.logits, want.logits, rtol=0, atol=1e-5)
    else:  # the RoutingConfig mapping: the same picks, best first
        assert torch.equal(r.indices.sort(-1).values, want.indices.sort(-1).values)
        order, theirs = r.indices.argsort(-1), want.indices.argsort(-1)
        torch.testing.assert_close(r.weights.gather(1, order), want.weights.gather(1, theirs), rtol=0, atol=1e-6)


def switch_by_hand(block, r):
    """E' · Σ_e f_e p̄_e from the record's picks and the softmax of the family's router logits (a mapped block:
    its own scores, sigmoid for DeepSeek-V3)."""
    f = torch.bincount(r.indices.flatten(), minlength=r.logits.shape[1]).double()
    p = (torch.softmax(r.logits.double(), dim=-1) if isinstance(block, HFExpertsBlock) else r.probs.double()).mean(0)
    return r.logits.shape[1] * (f / f.sum() * p / p.sum()).sum()


def with_selection_bias(model):
    """A copy of ``model`` whose routers' selection biases (``e_score_correction_bias``, zeros at init) are random,
    so the imported routing must apply them as the family does."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.3)
    return model


def import_export_round_trip(model_type, tmp_path, **options):
    hf = with_selection_bias(original(model_type))
    ids = tiny_input_ids()
    expected, seen = observed_picks(hf, ids)
    tokens_before = greedy(hf, ids[:1])
    state = {k: v.clone() for k, v in hf.state_dict().items()}

    model = from_hf(copy.deepcopy(hf), aux_criterion={"switch": 0.01}, **options)
    blocks = moefy.moe_blocks(model)
    assert len(blocks) == len(seen) >= 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert (logits - expected).abs().max() < 1e-5
    for block, want in zip(blocks, seen):
        check_record(block, block.routing, want, ids.numel())
    assert same_generation(greedy(model, ids[:1]), tokens_before)

    # the aux loss: the Switch loss of the family's own picks and router logits, with a gradient to its router
    model.train()
    out = model(input_ids=ids, labels=ids)
    for block in blocks:
        torch.testing.assert_close(block.aux_losses["switch"].double(), switch_by_hand(block, block.routing), rtol=1e-5,
                                   atol=1e-7)
    aux = moefy.aux_loss(model)
    assert float(aux.detach()) > 0
    (out.loss + aux).backward()
    routers = [block._family_router if isinstance(block, HFExpertsBlock) else block.router for block in blocks]
    assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters()) for r in routers)
    model.eval().zero_grad()

    # export: the files transformers writes for the family's own model, tensor for tensor; from_pretrained gives
    # its class back with the very same weights and logits
    try:
        hf.save_pretrained(tmp_path / "hf")
    except Exception as err:  # noqa: BLE001 - transformers cannot write the tiny Inkling2 models at all
        with pytest.raises(type(err)):  # (save_pretrained pads lm_head to the text config's vocabulary)
            export(model, tmp_path / "export")
        return model
    export(model, tmp_path / "export")
    written, own = saved_tensors(tmp_path / "export"), saved_tensors(tmp_path / "hf")
    assert written.keys() == own.keys() and all(torch.equal(written[k], v) for k, v in own.items())
    try:
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    except Exception as err:  # noqa: BLE001 - only where transformers cannot load its own folder either
        with pytest.raises(type(err)):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
        return model
    assert type(back) is type(hf)
    got = back.eval().state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    with torch.no_grad():  # not bit-exact for a few families (Zaya: 1.5e-8) with transformers' own round trip
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    return model


def saved_tensors(folder):
    """Every tensor of the safetensors files in ``folder``, by key."""
    from safetensors.torch import load_file
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("model_type", IMPORTED)
def test_import_keeps_the_logits_records_the_picks_and_export_gives_the_family_back(model_type, tmp_path):
    model = import_export_round_trip(model_type, tmp_path)
    kind = HFMoEBlock if model_type in MAPPED else HFExpertsBlock
    assert all(type(b) is kind for b in moefy.moe_blocks(model))


@pytest.mark.parametrize("model_type", sorted(MAPPED))
def test_the_mapped_families_also_import_with_their_own_router(model_type, tmp_path):
    model = import_export_round_trip(model_type, tmp_path, keep_router=True)
    assert all(type(b) is HFExpertsBlock for b in moefy.moe_blocks(model))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_families_without_an_experts_call_are_refused_with_the_reason(model_type):
    hf = original(model_type)
    reason = NOT_IMPORTED[REFUSED[model_type]]
    with pytest.raises(ValueError, match="cannot be imported: " + reason.split(" (")[0][:40]):
        from_hf(copy.deepcopy(hf))


def test_coverage():
    """The README's table: observe every family, import and export all but the refused ones."""
    assert len(ALL) >= 49 and len(IMPORTED) >= 40
    assert set(REFUSED) <= set(ALL)


def family_model(model_type, **options):
    return from_hf(copy.deepcopy(original(model_type)), **options)


@pytest.mark.parametrize("model_type", ["gpt_oss", "longcat_flash"])
def test_router_replay_reproduces_values_and_gradients(model_type):
    """A replayed training forward (recompute: this forward's family weights at the recorded picks; frozen: the
    recorded weights) gives the recorded forward's logits and router gradients bit for bit."""
    model = family_model(model_type, aux_criterion={"switch": 0.01}).train()
    ids = tiny_input_ids()
    replay = RouterReplay(model)

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        (out.loss + moefy.aux_loss(model)).backward()
        return out.logits.detach(), [p.grad.clone() for b in moefy.moe_blocks(model)
                                     for p in b._family_router.parameters()]

    with replay.record():
        logits, grads = step()
    assert all(len(calls) == 1 for calls in replay.records.values())
    for mode in ("recompute", "frozen"):
        with replay.replay(weights=mode):
            again, again_grads = step()
        assert torch.equal(again, logits)
        if mode == "recompute":
            assert all(torch.equal(a, b) for a, b in zip(again_grads, grads))
    # other picks than recorded: recompute cannot weight them (the family's router would have to), and LongCat's
    # zero experts are its own block's: refused by name
    block = moefy.moe_blocks(model)[0]
    call = replay.records[next(iter(replay.records))][0]
    replay.records[next(iter(replay.records))][0] = type(call)(call.indices.roll(1, dims=0), call.weights)
    with pytest.raises(RuntimeError, match="pick other experts than recorded; replay with weights='frozen'"):
        with replay.replay(weights="recompute"):
            model(input_ids=ids)
    if block.config.null_columns:
        with pytest.raises(RuntimeError, match="computes its null experts"):
            with replay.replay(weights="frozen"):
                model(input_ids=ids)


@pytest.mark.parametrize("model_type", ["gpt_oss", "nemotron_h", "ergo", "dbrx", "longcat_flash", "zaya"])
def test_gradients_equal_transformers(model_type):
    """Backward through the imported model gives transformers' gradients for every parameter (routers, stacked
    experts with biases / transposed / ungated layouts, per-expert calls, null experts)."""
    hf = copy.deepcopy(original(model_type))
    model = from_hf(copy.deepcopy(hf))
    ids = tiny_input_ids()
    for m in (hf, model):
        m(input_ids=ids, labels=ids).loss.backward()
    want = dict(hf.named_parameters())
    got = {name.replace(".hf_experts.", "."): p for name, p in model.named_parameters()}
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert p.grad is not None and got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["gpt_oss", "mixtral", "nemotron_h"])
def test_the_grouped_mm_path_gives_the_same_logits_and_gradients(model_type, monkeypatch):
    """The path CUDA bf16 takes (one ``torch._grouped_mm`` per projection, offsets found on the device), run on CPU
    in float32: the same logits and expert gradients as the per-expert loop (transposed, biased, ungated layouts)."""
    import moefy.hf.generic as generic
    hf = original(model_type)
    ids = tiny_input_ids()
    runs = []
    for grouped in (False, True):
        monkeypatch.setattr(generic, "_grouped_kernel", lambda x, w, grouped=grouped: grouped)
        model = from_hf(copy.deepcopy(hf), keep_router=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach(), [b.hf_experts.down_proj.grad for b in moefy.moe_blocks(model)]))
    (loop, loop_grads), (grouped, grouped_grads) = runs
    torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-6)
    for a, b in zip(grouped_grads, loop_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_experts_moefy_cannot_reproduce_are_refused_and_nothing_changes():
    model = copy.deepcopy(original("mixtral"))
    experts = model.model.layers[1].mlp.experts
    own = experts.forward
    experts.forward = lambda h, i, w: own(h, i, w) ** 2  # not a weighted sum of per-expert outputs
    with pytest.raises(ValueError, match=r"neither the stacked-weights math nor per-expert calls reproduce "
                                         r"MixtralExperts \(model.layers.1.mlp\)"):
        from_hf(model, keep_router=True)
    assert not moefy.moe_blocks(model) and model.model.layers[0].mlp.experts.__class__.__name__ == "MixtralExperts"


def test_token_mask_and_capacity_on_a_direct_call():
    """Called on its own, the block routes only the tokens ``token_mask`` keeps (the others: zero output, in no
    count) and caps each expert at ``token_capacity_factor`` (the dropped slots counted)."""
    model = family_model("qwen3_next", keep_router=True, token_capacity_factor=0.5)
    block = moefy.moe_blocks(model)[0]
    experts = block.hf_experts
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 32, generator=gen)
    k = block.k
    index = torch.rand(10, 8, generator=gen).argsort(-1)[:, :k]           # k distinct experts per token
    weights = torch.rand(10, k, generator=gen)
    mask = torch.tensor([True, False] * 5)
    block.__dict__["_router_out"] = torch.randn(10, 8, generator=gen)  # as the family's router would leave it
    with torch.no_grad():
        y = block(x, index, weights, token_mask=mask)
    r = block.routing
    capacity = math.ceil(0.5 * 5 * k / 8)  # ceil(factor · T_kept · k / E)
    assert k == 4 and r.num_tokens == 5 and max(r.counts) == capacity
    assert sum(r.counts) + int(r.dropped) == 5 * k and int(r.dropped) > 0
    assert torch.equal(y[~mask], torch.zeros(5, 32))
    # kept slots: the family's experts module on the same picks, the dropped ones' weight zeroed
    kept = torch.zeros(10, k, dtype=torch.bool)
    for t, e in zip(r.token_index.tolist(), r.expert_index.tolist()):  # input token ids
        kept[t, (index[t] == e).nonzero()[0, 0]] = True
    with torch.no_grad():
        want = experts(x, index, weights * kept)
    torch.testing.assert_close(y[mask], want[mask], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="token_capacity_factor=0.5 cannot be exported"):
        export(model, "unused")


def test_save_pretrained_copies_and_the_recorder(tmp_path):
    """``model.save_pretrained`` writes the family's layout (loads without moefy, same logits); deepcopy and pickle
    keep working blocks; RoutingRecorder reads the blocks; output_router_logits still works (routers kept)."""
    model = family_model("glm4_moe", keep_router=True)
    ids = tiny_input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back).__name__ == "Glm4MoeForCausalLM"
    assert family_state_dict(model).keys() == back.state_dict().keys()
    for twin in (back, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert (twin(input_ids=ids).logits - expected).abs().max() < 1e-6
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(input_ids=ids)
    assert moefy.moe_blocks(twin)[0].routing is not None and moefy.moe_blocks(model)[0].routing.num_tokens == 12
    model.train()(input_ids=ids, labels=ids).loss.backward()
    block = moefy.moe_blocks(model)[0]
    assert block.routing.tokens_shape == (2, 6) and block.__dict__["_router_out"] is None  # no graph kept
    model.eval()
    with moefy.RoutingRecorder(model) as rec, torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert list(rec.stats) == ["model.layers.1.mlp.experts"]
    assert float(rec.stats["model.layers.1.mlp.experts"].load.sum()) == ids.numel() * model.config.num_experts_per_tok
    assert out.router_logits is not None or out.aux_loss is not None


def test_bad_options_and_models_are_named():
    with pytest.raises(ValueError, match=r"option hole=True: .* keeps the family's own router .* allowed options"):
        family_model("gpt_oss", hole=True)
    with pytest.raises(ValueError, match=r"option k=1: .* keeps the family's own router"):
        family_model("mixtral", keep_router=True, k=1)
    model = family_model("gpt_oss")
    with pytest.raises(ValueError, match=r"is not a Hugging Face MoE model moefy imports: .* \(already imported"):
        from_hf(model)
    with pytest.raises(TypeError, match="keep_router must be None, True or False"):
        from_hf(model, keep_router="yes")
    with pytest.raises(TypeError, match="model must be a transformers model"):
        from_hf("gpt_oss")


def coverage_table() -> str:
    """The README's table: family → observe / import / export, and the reason for every gap."""
    lines = ["| model_type | causal LM | observe | import (`from_hf`) | export |", "|---|---|---|---|---|"]
    short = {"llama4": "input scaled by the router score, every expert on every token",
             "jetmoe": "experts take sorted token lists; attention experts (MoA)",
             "doge": "product-key embedding experts"}
    for model_type, family in sorted(families().items()):
        if model_type in REFUSED:
            lines.append(f"| {model_type} | {family.causal_lm} | ✓ | ✗ {short[REFUSED[model_type]]} | – |")
            continue
        block = moefy.moe_blocks(from_hf(copy.deepcopy(tiny_model(model_type))))[0]
        if isinstance(block, HFExpertsBlock):
            how = "✓ its router" + (", per-expert calls" if block.math == "call" else "") + (
                f", {block.config.null_columns[0]} null experts" if block.config.null_columns else "")
        else:
            how = "✓ RoutingConfig" + (" (sigmoid, bias, groups)" if block.config.selection_bias else "")
        lines.append(f"| {model_type} | {family.causal_lm} | ✓ | {how} | {'✓¹' if 'inkling2' in model_type else '✓'} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_hf_import_all.py: the table
    torch.set_num_threads(1)
    print(coverage_table())
