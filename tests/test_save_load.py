"""moefy.save / moefy.load: a moefied model round-trips bit for bit, for every routing option."""
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moefy
from conftest import ResidualMLPNet
from moefy.routing.bias_balance import update_selection_bias


OPTIONS = {
    "default": dict(),
    "k2": dict(k=2),
    "hole": dict(k=2, hole=True),
    "expert_choice": dict(expert_choice=True),
    "gumbel": dict(noise="gumbel"),
    "gaussian": dict(k=2, noise="gaussian"),
    "jitter": dict(noise="jitter"),
    "simple": dict(k=2, noise="simple"),
    "token_capacity": dict(k=2, token_capacity_factor=1.0, drop_policy="position"),
    "shared_gate": dict(k=2, num_shared=1, shared_gate=True),
    "groups_bias": dict(k=2, n_group=2, topk_group=1, score_func="sigmoid", selection_bias=True,
                        bias_update_rate=0.05, routed_scaling_factor=2.0),
    "null_experts": dict(k=2, null_experts={"zero": 1, "copy": 1, "constant": 1}),
    "aux": dict(k=2, aux_criterion={"switch": 0.01, "z": 0.001}, temperature=0.5),
    "fused": dict(k=2, fused=True),
}


def _train(model, steps=3):
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        y = model(torch.randn(2, 6, 8))  # (B, L, 4)
        loss = y.square().mean() + moefy.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_selection_bias(model)  # moves the selection bias with bias_update_rate > 0


def _same(a, b, *inputs):
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    ya = ya[0] if isinstance(ya, tuple) else ya
    yb = yb[0] if isinstance(yb, tuple) else yb
    assert torch.equal(ya, yb)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_round_trip_is_exact_after_training(tmp_path, name):
    torch.manual_seed(0)
    model = moefy.moefy(ResidualMLPNet(), 4, target="blocks.*", expert_noise=0.1, **OPTIONS[name])
    _train(model)
    path = moefy.save(model, tmp_path)
    assert os.path.basename(path) == "moefy.safetensors"
    torch.manual_seed(123)  # a different dense init: every weight must come from the file
    loaded = moefy.load(ResidualMLPNet(), tmp_path)
    _same(model, loaded, torch.randn(3, 5, 8))
    saved = [b.config for b in moefy.moe_blocks(model)]
    assert [b.config for b in moefy.moe_blocks(loaded)] == saved
    if name == "groups_bias":  # the selection-bias buffer moved in training and round-trips
        bias = model.blocks[0].router.score_correction_bias
        assert bias.abs().sum() > 0 and torch.equal(loaded.blocks[0].router.score_correction_bias, bias)


def test_moefy_json_records_every_conversion(tmp_path):
    model = moefy.moefy(ResidualMLPNet(), 3, k=2, target="blocks.*", num_shared=1, aux_criterion=["switch"],
                        null_experts={"constant": 1})
    moefy.save(model, tmp_path)
    meta = json.loads((tmp_path / "moefy.json").read_text())
    assert meta["format_version"] == 2 and meta["weights"] == "moefy.safetensors"
    weights = (tmp_path / "moefy.safetensors").read_bytes()  # the commit record: its size and the save's id
    header = json.loads(weights[8:8 + int.from_bytes(weights[:8], "little")])
    assert meta["files"] == {"moefy.safetensors": {"bytes": len(weights),
                                                   "save_id": header["__metadata__"]["moefy_save_id"]}}
    entries = meta["conversions"]
    assert [e["path"] for e in entries] == ["blocks.0", "blocks.1"]
    e = entries[1]
    assert (e["class"], e["num_experts"], e["num_shared"], e["input_dim"], e["chain"]) == \
        ("ModuleMixture", 3, 1, 16, None)
    assert e["config"]["k"] == 2 and e["config"]["layer_id"] == 1 and e["config"]["route"] == "tokens"
    assert e["config"]["aux_criterion"] == ["switch"] and e["config"]["null_experts"] == {"constant": 1}
    assert set(e["config"]) == set(moefy.RoutingConfig.__dataclass_fields__)


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate, self.output = nn.Linear(8, 24), nn.Linear(24, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.output(self.intermediate(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(FFN() for _ in range(2))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = x + self.attn(x, x, x)[0]
        for layer in self.layers:
            x = layer(x)
        return x


def test_chain_and_attention_round_trip(tmp_path):
    model = Encoder()
    for layer in model.layers:
        moefy.moefy_chain(layer, ["intermediate", "output"], num_experts=3, k=2, expert_noise=0.1)
    moefy.moefy(model, 2, target=nn.MultiheadAttention, expert_noise=0.1)
    _train_encoder = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 5, 8)).square().mean().backward()
    _train_encoder.step()
    moefy.save(model, tmp_path)
    entries = json.loads((tmp_path / "moefy.json").read_text())["conversions"]
    assert [(e["path"], e["class"], e["chain"]) for e in entries] == [
        ("layers.0.intermediate", "ModuleMixture", {"parent": "layers.0", "names": ["intermediate", "output"]}),
        ("layers.1.intermediate", "ModuleMixture", {"parent": "layers.1", "names": ["intermediate", "output"]}),
        ("attn", "AttentionMixture", None)]
    loaded = moefy.load(Encoder(), tmp_path)
    assert isinstance(loaded.layers[1].output, nn.Identity)
    _same(model, loaded, torch.randn(3, 5, 8))


def test_root_mixture_and_tied_weights_round_trip(tmp_path):
    def base():
        return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    mixture = moefy.moefy(base(), 3, k=2, expert_noise=0.1)
    moefy.save(mixture, tmp_path / "root")
    _same(mixture, moefy.load(base(), tmp_path / "root"), torch.randn(5, 8))

    class Tied(nn.Module):  # tied embedding / head, as in many language models: stored once
        def __init__(self):
            super().__init__()
            self.emb, self.mlp = nn.Embedding(10, 8), base()
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h + self.mlp(h))
    model = moefy.moefy(Tied(), 2, target="mlp", expert_noise=0.1)
    moefy.save(model, tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "moefy.json").read_text())["aliases"] == {"head.weight": "emb.weight"}
    loaded = moefy.load(Tied(), tmp_path / "tied")
    assert loaded.head.weight is loaded.emb.weight
    _same(model, loaded, torch.randint(0, 10, (2, 5)))


def test_dtypes_round_trip(tmp_path):
    model = moefy.moefy(ResidualMLPNet(), 3, k=2, target="blocks.*", expert_noise=0.1).double()  # the routers too
    moefy.save(model, tmp_path)
    loaded = moefy.load(ResidualMLPNet().double(), tmp_path)  # rebuilt routers start float32
    assert loaded.blocks[0].router.gate.weight.dtype == torch.float64
    _same(model, loaded, torch.randn(2, 3, 8, dtype=torch.float64))


def test_without_safetensors_falls_back_to_torch_save(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    model = moefy.moefy(ResidualMLPNet(), 2, target="blocks.*", k=2)
    path = moefy.save(model, tmp_path)
    assert os.path.basename(path) == "moefy.pt" and sorted(os.listdir(tmp_path)) == ["moefy.json", "moefy.pt"]
    _same(model, moefy.load(ResidualMLPNet(), tmp_path), torch.randn(2, 3, 8))


# -------------------------------------------------------------------------------------- import graph
def test_no_import_cycle_through_save_surgery_and_from_hf():
    """convert/save ↔ convert/surgery ↔ hf/from_hf is untangled: moefy.convert imports nothing of moefy.hf (not even
    lazily); moefy.hf registers HFMoEBlock in the registry moefy.convert owns (moefy.convert.recorded)."""
    from test_import_graph import cycles, module_graph
    graph = module_graph()
    assert "moefy.convert.writer" in graph["moefy.convert.surgery"]  # the graph sees these edges
    assert "moefy.convert.recorded" in graph["moefy.hf.from_hf"]
    upward = sorted((a, b) for a in graph if a.startswith("moefy.convert") for b in graph[a] if b.startswith("moefy.hf"))
    assert upward == []
    assert [c for c in cycles(graph) if any(m.startswith(("moefy.convert", "moefy.hf")) for m in c)] == []
    from moefy.convert.recorded import RECORDED
    assert RECORDED["HFMoEBlock"].cls is moefy.hf.HFMoEBlock


# ----------------------------------------------------------------------------------------- bad input
def test_given_state_dict_is_what_is_written(tmp_path):
    model = moefy.moefy(ResidualMLPNet(), 2, target="blocks.*")
    state = {k: v * 2 for k, v in model.state_dict().items()}  # e.g. what Trainer gathered
    moefy.save(model, tmp_path, state_dict=state)
    loaded = moefy.load(ResidualMLPNet(), tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = moefy.moefy(ResidualMLPNet(), 2, target="blocks.*")
    with pytest.raises(ValueError, match="state_dict must be a dict with exactly model.state_dict"):
        moefy.save(model, tmp_path, state_dict={"w": torch.ones(1)})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        moefy.save("model", tmp_path)
    with pytest.raises(TypeError, match="folder must be a path"):
        moefy.save(model, 3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        moefy.load(None, tmp_path)
    with pytest.raises(FileNotFoundError, match="folder .*missing.* does not exist"):
        moefy.load(ResidualMLPNet(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no moefy.json .*not written by moefy.save"):
        moefy.load(ResidualMLPNet(), tmp_path)
    moefy.save(model, tmp_path)

    class Other(nn.Module):  # no "blocks": the recorded path does not exist
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="no submodule 'blocks.0'.*pass the dense model"):
        moefy.load(Other(), tmp_path)
    mismatch = "moefy.safetensors: shape mismatches ['emb.bias: saved (16,), model (12,)'"
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        moefy.load(ResidualMLPNet(dim=12), tmp_path)  # same names, other sizes: checked before the conversions
    with pytest.raises(ValueError, match=r"missing keys \[\].*unexpected keys \['extra'\]"):
        state = moefy.moefy(ResidualMLPNet(), 2, target="blocks.*").state_dict()
        torch.save({**state, "extra": torch.zeros(1)}, tmp_path / "moefy.pt")
        meta = json.loads((tmp_path / "moefy.json").read_text())  # format 1 (no commit record) still loads
        del meta["files"]
        (tmp_path / "moefy.json").write_text(json.dumps({**meta, "format_version": 1, "weights": "moefy.pt"}))
        moefy.load(ResidualMLPNet(), tmp_path)
    (tmp_path / "moefy.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        moefy.load(ResidualMLPNet(), tmp_path)


# ------------------------------------------------------------------------------------ Hugging Face
def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM, cfg


def test_llama_round_trips_and_plain_hf_paths_are_loud(tmp_path, caplog):
    Llama, cfg = _llama()
    torch.manual_seed(0)
    model = moefy.moefy(Llama(cfg), 4, k=2, target="mlp", route="tokens", expert_noise=0.1)
    ids = torch.randint(0, 64, (2, 7))
    moefy.save(model, tmp_path / "moefy")
    loaded = moefy.load(Llama(cfg), tmp_path / "moefy")
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the base's config goes along, naming a weights file from_pretrained refuses: a plain one fails loudly
    files = ["config.json", "model.safetensors.index.json", "moefy.json", "moefy.safetensors"]  # index: for Trainer
    assert sorted(os.listdir(tmp_path / "moefy")) == files
    with pytest.raises(ValueError, match=r"moefy\.hf\.load"):
        Llama.from_pretrained(tmp_path / "moefy")
    # the moefied model's own save_pretrained (what Trainer calls) writes the same folder, and says so
    with caplog.at_level(logging.INFO, logger="moefy"):
        model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert "writes moefy.save's format" in caplog.text
    assert sorted(os.listdir(tmp_path / "hf")) == files
    with pytest.raises(ValueError, match=r"moefy\.hf\.load"):
        Llama.from_pretrained(tmp_path / "hf")
    again = moefy.load(Llama(cfg), tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert type(again.save_pretrained).__name__ == "partial"  # loaded models keep the behaviour
    # back to dense, save_pretrained is transformers' own again
    moefy.unmoefy(model)
    model.save_pretrained(tmp_path / "dense")
    assert "model.safetensors" in os.listdir(tmp_path / "dense")
    # and moefy.load says what a dense HF folder is
    with pytest.raises(FileNotFoundError, match="dense Hugging Face checkpoint.*moefy it"):
        moefy.load(Llama(cfg), tmp_path / "dense")


def test_readme_save_load_snippet_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "moefy.load(" in s)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert isinstance(scope["loaded"][0], moefy.ModuleMixture)


def test_moefied_save_pretrained_refuses_push_to_hub(tmp_path):
    Llama, cfg = _llama()
    model = moefy.moefy(Llama(cfg), 2, k=1, target="mlp")
    with pytest.raises(ValueError, match="push_to_hub=True: a moefied model's save_pretrained"):
        model.save_pretrained(tmp_path, push_to_hub=True)
    assert not any(tmp_path.iterdir())


def test_copies_of_a_moefied_hf_model_save_themselves(tmp_path):
    import copy
    import io
    Llama, cfg = _llama()
    model = moefy.moefy(Llama(cfg), 2, k=1, target="mlp")
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    for other in (twin, pickled):
        assert other.save_pretrained.args[0] is other  # bound to the copy, not to the original
    with torch.no_grad():
        twin.model.layers[0].mlp.experts[0].up_proj.weight.add_(1.0)
    twin.save_pretrained(tmp_path)
    assert torch.equal(moefy.load(Llama(cfg), tmp_path).model.layers[0].mlp.experts[0].up_proj.weight,
                       twin.model.layers[0].mlp.experts[0].up_proj.weight)
