"""moefy.save / moefy.hf.load of a family-routed model (``from_hf``'s general path: GPT-OSS, ERNIE-4.5, PhiMoE,
DBRX, ... keep their own router, :class:`~moefy.hf.generic.HFExpertsBlock`): ``moefy.json`` records each block
(path, config, source, math, num_experts), the load rebuilds it on the family's experts module of a fresh base and
gives ``from_hf``'s model back: the same logits, routing records, configs and weights, pruned or not, with its
options; its ``save_pretrained`` and ``moefy.hf.export`` write what ``from_hf``'s model writes. A hostile entry fails
before anything is built, naming ``moefy.json`` and the field.
"""
import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

import moefy  # noqa: E402
from hf_moe_families import tiny_input_ids, tiny_model  # noqa: E402
from moefy.hf.generic import HFExpertsBlock, family_blocks, family_state_dict  # noqa: E402

IDS = tiny_input_ids()  # (2, 6)
MATH = {"gpt_oss": "stacked", "ernie4_5_moe": "stacked", "phimoe": "stacked", "dbrx": "call"}


def _imported(model_type, **options):
    try:
        base = tiny_model(model_type)
    except RuntimeError as err:
        pytest.skip(str(err))
    return moefy.hf.from_hf(copy.deepcopy(base), **options)


def _load(folder):
    model = moefy.hf.load(folder)
    model.set_attn_implementation("eager")  # tiny_model's; config.json does not keep it (the default is sdpa)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_same(loaded, model):
    """Same logits, weights, blocks (class, E, math, config) and routing records of the last forward."""
    assert torch.equal(_logits(loaded), _logits(model))
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    blocks, loaded_blocks = family_blocks(model), family_blocks(loaded)
    assert [p for p, _ in loaded_blocks] == [p for p, _ in blocks] and blocks
    for (_, a), (_, b) in zip(blocks, loaded_blocks):
        assert type(b) is HFExpertsBlock and (b.num_experts, b.math, b.source, b.config) == \
            (a.num_experts, a.math, a.source, a.config)
        for field in ("logits", "indices", "weights", "token_index", "expert_index", "weight", "count"):
            assert torch.equal(getattr(b.routing, field), getattr(a.routing, field)), field


@pytest.mark.parametrize("model_type", list(MATH))
def test_family_routed_model_round_trips(tmp_path, model_type):
    model = _imported(model_type)
    moefy.save(model, tmp_path)
    entries = json.loads((tmp_path / "moefy.json").read_text())["conversions"]
    assert [(e["path"], e["class"], e["source"], e["math"], e["num_experts"]) for e in entries] == \
        [(p, "HFExpertsBlock", b.source, MATH[model_type], b.num_experts) for p, b in family_blocks(model)]
    loaded = _load(tmp_path)
    _assert_same(loaded, model)
    if model_type == "ernie4_5_moe":  # its (1, E) statistics, outside the experts module, load with the base
        statistics = {k: v for k, v in loaded.state_dict().items() if k.endswith("moe_statics.e_score_correction_bias")}
        assert [tuple(v.shape) for v in statistics.values()] == [(1, 8)]


def _files(folder):
    return load_file(str(folder / "model.safetensors"))


def test_loaded_model_saves_pretrained_and_exports_as_from_hf_gave_it(tmp_path):
    """save_pretrained writes the family's layout (transformers' own files, no moefy.json), the same tensors as the
    from_hf model's; export too, and from_pretrained of it gives the family's logits."""
    model = _imported("gpt_oss")
    moefy.save(model, tmp_path / "moefy")
    loaded = _load(tmp_path / "moefy")
    model.save_pretrained(tmp_path / "want")
    loaded.save_pretrained(tmp_path / "got")
    assert not (tmp_path / "got" / "moefy.json").exists()
    want, got = _files(tmp_path / "want"), _files(tmp_path / "got")
    assert sorted(got) == sorted(family_state_dict(model)) and all(torch.equal(got[k], want[k]) for k in want)
    moefy.hf.export(loaded, tmp_path / "export")
    exported = _files(tmp_path / "export")
    assert sorted(exported) == sorted(want) and all(torch.equal(exported[k], want[k]) for k in want)
    native = type(loaded).from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(native), _logits(tiny_model("gpt_oss")), atol=1e-5, rtol=0)


def test_pruned_family_routed_model_round_trips(tmp_path):
    """ERNIE-4.5 pruned to 4 of 8 experts (reap scores): config.json says 4, the base is built with 4 (its (1, E)
    statistics sliced to (1, 4)), the load gives the pruned model back and exports it."""
    model = _imported("ernie4_5_moe")
    kept = moefy.compress.prune_experts(model, 4, moefy.compress.expert_scores(model, [IDS], "reap"))
    assert [len(ids) for ids in kept.values()] == [4] and model.config.moe_num_experts == 4
    moefy.save(model, tmp_path / "moefy")
    assert json.loads((tmp_path / "moefy" / "config.json").read_text())["moe_num_experts"] == 4
    loaded = _load(tmp_path / "moefy")
    _assert_same(loaded, model)
    assert loaded.config.moe_num_experts == 4
    statistics = [v for k, v in loaded.state_dict().items() if k.endswith("moe_statics.e_score_correction_bias")]
    assert [tuple(v.shape) for v in statistics] == [(1, 4)]
    moefy.hf.export(loaded, tmp_path / "export")
    model.save_pretrained(tmp_path / "want")
    want, exported = _files(tmp_path / "want"), _files(tmp_path / "export")
    assert sorted(exported) == sorted(want) and all(torch.equal(exported[k], want[k]) for k in want)


def test_options_survive_the_round_trip(tmp_path):
    """aux_criterion (the same aux loss after load) and a token capacity that drops slots (the same drops and
    logits): the recorded config, not the family's defaults."""
    model = _imported("phimoe", aux_criterion={"switch": 0.01}, token_capacity_factor=0.5)
    moefy.save(model, tmp_path)
    loaded = _load(tmp_path)
    _assert_same(loaded, model)
    for (_, a), (_, b) in zip(family_blocks(model), family_blocks(loaded)):
        assert b.config.aux_criterion == {"switch": 0.01} and b.config.token_capacity_factor == 0.5
        assert int(b.routing.dropped) == int(a.routing.dropped) > 0
    aux = moefy.aux_loss(model)
    assert aux > 0 and torch.equal(moefy.aux_loss(loaded), aux)


# ------------------------------------------------------------------------------------------------- hostile
def _edit(folder: Path, **fields):
    meta = json.loads((folder / "moefy.json").read_text())
    for name, value in fields.items():
        if value is None:
            del meta["conversions"][0][name]
        else:
            meta["conversions"][0][name] = value
    (folder / "moefy.json").write_text(json.dumps(meta))


def _config(folder: Path, **options):
    meta = json.loads((folder / "moefy.json").read_text())
    meta["conversions"][0]["config"].update(options)
    (folder / "moefy.json").write_text(json.dumps(meta))


def _moved_to_router(folder: Path) -> None:
    """An attacker moves layer 0's stacked experts under the router's path, consistently: the weights renamed and
    committed again (size and sha256), the entry's path set to the router."""
    old, new = "model.layers.0.mlp.experts.", "model.layers.0.mlp.router."
    state = load_file(str(folder / "moefy.safetensors"))
    save_file({(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()},
              str(folder / "moefy.safetensors"))
    data = (folder / "moefy.safetensors").read_bytes()
    meta = json.loads((folder / "moefy.json").read_text())
    meta["files"]["moefy.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta["conversions"][0]["path"] = "model.layers.0.mlp.router"
    (folder / "moefy.json").write_text(json.dumps(meta))


def _empty_experts_claiming_many(folder: Path) -> None:
    """An attacker empties every stacked experts tensor (0 rows: 0 is a multiple of any count) and claims 10^8
    experts in moefy.json and config.json, everything committed again: the base would be built with 10^8 experts."""
    state = load_file(str(folder / "moefy.safetensors"))
    save_file({k: (v[:0].contiguous() if ".hf_experts." in k else v) for k, v in state.items()},
              str(folder / "moefy.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 10 ** 8}))
    meta = json.loads((folder / "moefy.json").read_text())
    for name in ("moefy.safetensors", "config.json"):
        data = (folder / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for entry in meta["conversions"]:
        entry["num_experts"] = 10 ** 8
    (folder / "moefy.json").write_text(json.dumps(meta))


# name: (mutation of a saved GPT-OSS folder, the field the error names, a part of the message)
HOSTILE = {
    "math=fused": (lambda f: _edit(f, math="fused"), "math", r"'fused'; allowed: one of \['stacked', 'call'\]"),
    "math=3": (lambda f: _edit(f, math=3), "math", "3; allowed: a string"),
    "math missing": (lambda f: _edit(f, math=None), "", r"missing field\(s\) \['math'\]"),
    "num_experts=0": (lambda f: _edit(f, num_experts=0), "num_experts", "0; allowed: an integer >= 1"),
    "num_experts=3": (lambda f: _edit(f, num_experts=3), "num_experts", "not a non-zero multiple of 3 rows"),
    "num_experts=4": (lambda f: _edit(f, num_experts=4), "num_experts", "the base model's GptOssMLP .* has 8"),
    "source=MixtralSparseMoeBlock": (lambda f: _edit(f, source="MixtralSparseMoeBlock"), "source",
                                     "experts module of a GptOssMLP; allowed: 'GptOssMLP'"),
    "path without stacked weights": (lambda f: _edit(f, path="model.layers.0.self_attn"), "path",
                                     r"holds no stacked experts at 'model.layers.0.self_attn' "
                                     r"\(model.layers.0.self_attn.hf_experts.\*\)"),
    "path not an experts module": (_moved_to_router, "path", "is a GptOssTopKRouter in a GptOssMLP, not the "
                                                            "experts module"),
    "empty experts, num_experts=1e8": (_empty_experts_claiming_many, "num_experts",
                                       r"100000000, but moefy.safetensors holds .*\(0, .*not a non-zero multiple"),
    "config noise=jitter": (lambda f: _config(f, noise="jitter"), "config", "routes with its own router"),
    "config k=2": (lambda f: _config(f, k=2), "config", "k=4"),
}


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family") / "gpt_oss"
    moefy.save(_imported("gpt_oss"), folder)
    return folder


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_entry_fails_fast_naming_moefy_json_and_the_field(tmp_path, gpt_oss_folder, name):
    mutate, field, message = HOSTILE[name]
    folder = tmp_path / "hostile"
    shutil.copytree(gpt_oss_folder, folder)
    mutate(folder)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as err:
        moefy.hf.load(folder)
    assert time.perf_counter() - start < 2.0
    text = str(err.value)
    assert text.startswith(f"{folder / 'moefy.json'}: conversions[0]" + (f".{field}:" if field else ":")), text
    assert "\n" not in text


def test_stacked_math_for_experts_without_stacked_weights_is_refused(tmp_path):
    """DBRX's experts (w1 / v1 / w2 of E · ffn rows) run by calls only: a folder claiming 'stacked' is refused."""
    moefy.save(_imported("dbrx"), tmp_path)
    _edit(tmp_path, math="stacked")
    with pytest.raises(ValueError, match=r"conversions\[0\]\.math: 'stacked', but DbrxExperts .* allowed: 'call'"):
        moefy.hf.load(tmp_path)


def test_a_failed_load_leaves_the_base_as_it_was_and_a_good_one_loads_into_it(tmp_path, gpt_oss_folder):
    """moefy.load(base, folder): a source that does not match fails on the meta copy (the base keeps its modules,
    by identity, and gets no hook on its routers); the saved folder then loads into the same base."""
    base = copy.deepcopy(tiny_model("gpt_oss"))
    modules = [(n, id(m)) for n, m in base.named_modules()]
    shutil.copytree(gpt_oss_folder, tmp_path / "bad")
    _edit(tmp_path / "bad", source="Nope")
    with pytest.raises(ValueError, match=r"moefy.json: conversions\[0\]\.source: 'Nope'"):
        moefy.load(base, tmp_path / "bad")
    assert [(n, id(m)) for n, m in base.named_modules()] == modules
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    loaded = moefy.load(base, gpt_oss_folder)
    assert loaded is base and len(family_blocks(base)) == 2
    _assert_same(base, _imported("gpt_oss"))


def test_a_config_with_an_infinite_float_loads(tmp_path):
    """transformers writes float("inf") in config.json as {"__float__": "Infinity"} (NemotronH's time_step_limit) and
    decodes it in from_pretrained; moefy.hf.load used to hand the tag to the config class, which refused the folder."""
    model = _imported("nemotron_h")
    moefy.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["time_step_limit"][1] == {"__float__": "Infinity"}
    loaded = _load(tmp_path)
    assert loaded.config.time_step_limit[1] == float("inf")
    _assert_same(loaded, model)


def test_a_recorded_stacked_math_that_does_not_reproduce_the_experts_is_refused(tmp_path):
    """An experts class whose forward is not transformers' stacked math imports with math="call"; a folder that
    says "stacked" for it would compute other outputs silently: the real conversion runs the import's probe."""
    base = copy.deepcopy(tiny_model("gpt_oss"))
    experts_class = type(base.model.layers[0].mlp.experts)
    doubled = type("DoubledExperts", (experts_class,), {"forward": lambda self, *a, **k: 2 * experts_class.forward(
        self, *a, **k)})
    for layer in base.model.layers:
        layer.mlp.experts.__class__ = doubled
    model = moefy.hf.from_hf(copy.deepcopy(base))
    assert [b.math for _, b in family_blocks(model)] == ["call", "call"]
    moefy.save(model, tmp_path)
    _edit(tmp_path, math="stacked")
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"moefy.json: conversions\[0\].math: 'stacked', but moefy's stacked math "
                                         r"does not reproduce DoubledExperts at 'model.layers.0.mlp.experts'"):
        moefy.load(fresh, tmp_path)
    assert all(type(layer.mlp.experts) is doubled for layer in fresh.model.layers)  # nothing replaced
