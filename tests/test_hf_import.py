"""moefy.hf.from_hf: the MoE blocks of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 as moefy blocks.

Same logits as transformers (float32), the recorder / load plots / heatmap / training log / ``moefy plot`` read
them, moefy.save / moefy.load keep them, and export writes the original class back with identical weights.
Small configs, random weights, no download.
"""
import pytest
import torch

import moefy

transformers = pytest.importorskip("transformers", reason="moefy.hf needs the transformers package")
from moefy.hf import HFMoEBlock, export, from_hf  # noqa: E402

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              num_experts_per_tok=2)
FAMILIES = {
    "Mixtral": dict(intermediate_size=16, num_local_experts=4),
    "Qwen2Moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                     num_experts=6, norm_topk_prob=False),
    "Qwen3Moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, norm_topk_prob=True,
                     mlp_only_layers=[0]),
    "Olmoe": dict(intermediate_size=16, num_experts=8, norm_topk_prob=False, num_experts_per_tok=3),
    "DeepseekV3": dict(intermediate_size=48, moe_intermediate_size=8, n_routed_experts=8, n_group=4, topk_group=2,
                       n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5, q_lora_rank=16,
                       kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=3),
}


def hf_moe(name):
    """A small transformers MoE causal LM with random weights (and a random DeepSeek selection bias)."""
    cfg = getattr(transformers, f"{name}Config")(**{**COMMON, **FAMILIES[name]})
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_import_keeps_the_logits_and_export_gives_back_the_weights(name, tmp_path):
    model = hf_moe(name)
    ids = torch.randint(0, VOCAB, (3, 9))
    expected = logits(model, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    hf_blocks = sum(type(m).__name__.endswith(("SparseMoeBlock", "MoE")) for m in model.modules())
    from_hf(model)
    blocks = moefy.moe_blocks(model)
    assert len(blocks) == hf_blocks >= 1 and all(isinstance(b, HFMoEBlock) for b in blocks)
    assert (logits(model, ids) - expected).abs().max() < 1e-5
    # every routed token slot went to an expert (no capacity): loads sum to tokens · k
    for b in blocks:
        assert int(b.routing.count.sum()) == ids.numel() * b.k
    # export writes the original class back, with the very same weights
    export(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(back).__name__ == f"{name}ForCausalLM"
    state = back.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_imported_routing_equals_the_hf_routers_picks():
    model = hf_moe("DeepseekV3")
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, hf_weights, hf_idx = layer.mlp.gate(x)
        from_hf(model)
        layer.mlp(x)
    r = layer.mlp.routing
    assert torch.equal(r.indices.sort(-1).values, hf_idx.sort(-1).values)
    order = r.indices.argsort(-1)
    torch.testing.assert_close(r.weights.gather(1, order), hf_weights.gather(1, hf_idx.argsort(-1)), atol=1e-6,
                               rtol=0)


def test_recorder_plots_log_and_cli_read_an_imported_model(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from moefy.observe.cli import main
    from moefy.viz import plot_experts_load, plot_load_heatmap
    model = from_hf(hf_moe("Qwen3Moe"))  # layer 0 is dense (mlp_only_layers), layer 1 a mixture
    with moefy.RoutingRecorder(model) as rec, moefy.TrainingLogWriter(tmp_path / "log.jsonl") as log:
        for epoch in (1, 2):
            rec.reset()
            model(torch.randint(0, VOCAB, (4, 8)))
            log.write(epoch, rec, {"loss": 1.0 / epoch})
    (name, stats), = rec.stats.items()
    assert name == "model.layers.1.mlp"
    assert float(stats.load.sum()) == 4 * 8 * 2
    heat = plot_load_heatmap(rec)
    assert len(heat.axes[0].get_yticklabels()) == 1
    assert plot_experts_load(model.model.layers[1].mlp) is not None
    assert main(["plot", str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "plots"), "--dpi", "30"]) == 0
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())


def test_save_load_round_trip_of_an_imported_model(tmp_path):
    model = from_hf(hf_moe("Mixtral"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    moefy.save(model, tmp_path)
    loaded = moefy.load(hf_moe("Mixtral"), tmp_path).eval()
    assert all(isinstance(b, HFMoEBlock) for b in moefy.moe_blocks(loaded))
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"model_type 'llama'\) is not a Hugging Face MoE model moefy imports"):
        from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    model = from_hf(hf_moe("Mixtral"))
    with pytest.raises(ValueError, match="no MixtralSparseMoeBlock left to convert"):
        from_hf(model)
    with pytest.raises(TypeError, match="model must be a transformers model"):
        from_hf("mixtral")


def test_bfloat16_round_trip_keeps_every_weight_and_dtype(tmp_path):
    """A bf16 DeepSeek-V3 keeps its router in float32 (as transformers does); export gives both back unchanged."""
    model = hf_moe("DeepseekV3").to(torch.bfloat16)
    for layer in model.model.layers[1:]:
        layer.mlp.gate.float()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    from_hf(model)
    assert model.model.layers[1].mlp.router.gate.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    export(model, tmp_path)
    state = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in original.items())


def test_training_options_generation_and_the_router_logits_guard(tmp_path):
    model = hf_moe("Mixtral")
    prompt = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    from_hf(model, aux_criterion={"switch": 0.01})
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.train()
    model(ids, labels=ids)
    blocks = moefy.moe_blocks(model)
    assert [b.layer_id for b in blocks] == [0, 1] and all(b.aux_criterion == {"switch": 0.01} for b in blocks)
    assert float(moefy.aux_loss(model).detach()) > 0
    with pytest.raises(ValueError, match="output_router_logits=True: after moefy.hf.from_hf"):
        model(ids, output_router_logits=True)
    moefy.save(model, tmp_path)  # the options are part of the saved conversion
    loaded = moefy.load(hf_moe("Mixtral"), tmp_path)
    assert all(b.aux_criterion == {"switch": 0.01} for b in moefy.moe_blocks(loaded))
    with pytest.raises(ValueError, match="output_router_logits=True"):
        loaded(ids, output_router_logits=True)
    # an export takes the checkpoint, not the training options
    export(model, tmp_path / "mixtral")


def test_hf_load_builds_the_base_from_the_saved_config(tmp_path):
    """moefy.hf.load(folder) = build the class named in config.json, then moefy.load: for a moefied Llama and an
    imported DeepSeek-V3 (bf16 experts, float32 router), with the same logits and dtypes."""
    from moefy.hf import load
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    moefied = moefy.moefy(llama, 4, k=2, target="mlp", expert_noise=0.1).eval()
    imported = from_hf(hf_moe("DeepseekV3")).eval().to(torch.bfloat16)
    for block in moefy.moe_blocks(imported):
        block.router.float()
    ids = torch.randint(0, VOCAB, (2, 6))
    for name, model in (("llama", moefied), ("deepseek", imported)):
        model.save_pretrained(tmp_path / name)
        back = load(tmp_path / name)
        assert type(back) is type(model) and not back.training
        assert {k: v.dtype for k, v in back.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}
        assert torch.equal(logits(back, ids), logits(model, ids))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load(tmp_path)


def test_export_import_export_of_a_qwen2_without_shared_expert(tmp_path):
    """A moefied Qwen2 without shared experts exports to Qwen2-MoE with a zero-size shared expert; importing that
    gives a block without shared experts (sigmoid(gate) · 0 = 0), the same logits, and exports again."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = moefy.moefy(transformers.Qwen2ForCausalLM(cfg), 4, k=2, target="mlp", expert_noise=0.1).eval()
    export(model, tmp_path / "a")
    qwen = from_hf(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")).eval()
    assert all(b.shared_experts is None and not b.shared_gate for b in moefy.moe_blocks(qwen))
    ids = torch.randint(0, VOCAB, (2, 7))
    assert (logits(qwen, ids) - logits(model, ids)).abs().max() < 1e-5
    export(qwen, tmp_path / "b")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert (logits(again, ids) - logits(model, ids)).abs().max() < 1e-5


def test_options_that_add_router_columns_are_refused():
    with pytest.raises(ValueError, match="adds router columns .* MixtralSparseMoeBlock router has no weights"):
        from_hf(hf_moe("Mixtral"), hole=True)


def test_include_aux_loss_adds_the_blocks_losses_to_outputs_loss():
    from moefy.hf import include_aux_loss
    model = from_hf(hf_moe("Mixtral"), aux_criterion={"switch": 0.01, "z": 0.001})
    ids = torch.randint(0, VOCAB, (2, 8))
    plain = model(ids, labels=ids).loss
    handle = include_aux_loss(model)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, plain + moefy.aux_loss(model), rtol=0, atol=1e-6)
    assert float(moefy.aux_loss(model).detach()) > 0
    out.loss.backward()  # the aux losses reach the routers
    assert all(b.router.gate.weight.grad.abs().sum() > 0 for b in moefy.moe_blocks(model))
    assert model(ids).loss is None  # no labels: nothing to add to
    handle.remove()
    torch.testing.assert_close(model(ids, labels=ids).loss, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no moefy block"):
        include_aux_loss(hf_moe("Mixtral"))


def test_switch_loss_convention_against_transformers_load_balancing_loss():
    """transformers' Mixtral load_balancing_loss_func on one layer's router logits is k · moefy's switch loss: its
    f counts tokens per expert (summing to k), moefy's counts assignments (summing to 1, as Megatron's)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from moefy.routing.losses import AUX_LOSSES
    model = from_hf(hf_moe("Mixtral"))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (3, 11)))
    for block in moefy.moe_blocks(model):
        r = block.routing
        hf = load_balancing_loss_func((r.logits,), block.num_experts, block.k)
        torch.testing.assert_close(hf, block.k * AUX_LOSSES["switch"](r), rtol=1e-6, atol=0)


def test_transformers_4_is_refused_with_the_version(monkeypatch):
    import sys
    model = hf_moe("Mixtral")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"need transformers >= 5 \(stacked MoE experts\), found 4.57.1"):
        from_hf(model)
    with pytest.raises(ImportError, match=r"need transformers >= 5"):
        export(model, "unused")
