"""moefy.hf.export after moefy.compress: a pruned or merged model is written as the same architecture with the
smaller expert count.

For Qwen3-MoE, Mixtral, Qwen2-MoE (gated shared expert), OLMoE and DeepSeek-V3 (2 expert groups, 1 kept per token,
selection bias) imported by ``from_hf``, and a moefied Llama (exported as Mixtral): ``from_pretrained`` of the
folder has config.<expert count> = the kept count, the very router rows / experts / biases that were kept (read
from the original weights by hand), the compressed model's logits (float32, 1e-5) and its greedy tokens. Layers
with different counts are refused by export (each layer's count named, nothing written) and reload with moefy,
the config has the largest count; the expert tensors in the safetensors file are kept/E of the original's bytes.
Tiny random models (hidden 32, 2 layers, 8 experts, vocabulary 64), no download.
"""
import json
import logging
import os
import struct

import pytest
import torch

import moefy

transformers = pytest.importorskip("transformers", reason="moefy.hf needs the transformers package")
from moefy.compress import expert_scores, merge_experts, prune_experts  # noqa: E402
from moefy.compress.resize import resize_block  # noqa: E402
from moefy.hf import export, from_hf  # noqa: E402
from moefy.hf.families import FAMILIES  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, E, KEEP = 64, 8, 4
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_experts_per_tok=2, intermediate_size=32, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
FAMILY_FIELDS = {
    "qwen3_moe": dict(num_experts=E, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=E),
    "qwen2_moe": dict(num_experts=E, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "olmoe": dict(num_experts=E),
    # every layer a MoE layer; multi-head latent attention wants as many key / value heads as query heads
    "deepseek_v3": dict(n_routed_experts=E, moe_intermediate_size=32, n_group=2, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
}
BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def hf_model(model_type):
    """A tiny random transformers MoE model of ``model_type`` (eval, float32); DeepSeek-V3's selection bias
    random, so that pruning must carry the kept experts' entries."""
    cfg = transformers.AutoConfig.for_model(model_type, **{**SMALL, **FAMILY_FIELDS[model_type]})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if model_type == "deepseek_v3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def batches(n=2, length=12):
    return [torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, new=5):
    return model.generate(IDS[:1], max_new_tokens=new, do_sample=False, pad_token_id=0)


def reload(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def tensor_bytes(folder):
    """{tensor name: bytes} from the header of ``folder``'s model.safetensors, and the file's data bytes."""
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    sizes = {name: end - start for name, (start, end) in ((k, v["data_offsets"]) for k, v in header.items())}
    return sizes, os.path.getsize(path) - 8 - size


CASES = [("qwen3_moe", "prune"), ("qwen3_moe", "merge"), ("mixtral", "prune"), ("mixtral", "merge"),
         ("qwen2_moe", "prune"), ("qwen2_moe", "merge"), ("olmoe", "prune"), ("deepseek_v3", "prune"),
         ("deepseek_v3", "merge")]


@pytest.mark.parametrize("model_type,how", CASES, ids=[f"{t}-{h}" for t, h in CASES])
def test_compressed_import_exports_as_its_architecture_with_fewer_experts(model_type, how, tmp_path):
    family = FAMILIES[model_type]
    model = hf_model(model_type)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model).__name__
    from_hf(model)
    data = batches()
    scores = expert_scores(model, data, "reap")
    before = logits(model)
    if how == "prune":
        kept = prune_experts(model, KEEP, scores)
    else:
        groups = merge_experts(model, KEEP, scores, data)
        kept = {name: [max(g, key=lambda i: (float(scores[name][i]), -i)) for g in groups[name]] for name in groups}
    assert getattr(model.config, family.num_experts) == KEEP
    after = logits(model)
    assert (after - before).abs().max() > 1e-3  # the compression changed the model: the equality below is not moot

    loaded = reload(export(model, tmp_path))
    assert type(loaded).__name__ == cls
    assert getattr(loaded.config, family.num_experts) == KEEP
    assert (logits(loaded) - after).abs().max() < 1e-5
    assert torch.equal(greedy(loaded), greedy(model)) and greedy(loaded).shape == (1, IDS.shape[1] + 5)

    weights = loaded.state_dict()
    for name in BLOCKS:
        rows = kept[name]  # prune: the kept experts; merge: each group's dominant expert, whose router row it keeps
        router = f"{name}.{family.router}."
        assert torch.equal(weights[router + "weight"], original[router + "weight"][rows])
        if model_type == "deepseek_v3":
            assert torch.equal(weights[router + "e_score_correction_bias"],
                               original[router + "e_score_correction_bias"][rows])
            assert [sum(i // (E // 2) == g for i in rows) for g in range(2)] == [KEEP // 2] * 2  # 2 from each group
        unmerged = range(KEEP) if how == "prune" else [j for j, g in enumerate(groups[name]) if len(g) == 1]
        for j in unmerged:
            for part in ("gate_up_proj", "down_proj"):
                key = f"{name}.experts.{part}"
                assert torch.equal(weights[key][j], original[key][rows[j]])
        if family.shared_path:  # the shared expert (and Qwen2-MoE's gate) untouched
            shared = [k for k in original if k.startswith(name + ".") and "shared_expert" in k]
            assert shared and all(torch.equal(weights[k], original[k]) for k in shared)


def test_moefied_llama_pruned_to_3_experts_exports_as_mixtral_with_3(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "num_experts_per_tok"})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = moefy.moefy(transformers.LlamaForCausalLM(cfg).eval(), num_experts=4, k=2, target="mlp",
                        expert_noise=0.2)
    down = {name: [e.down_proj.weight.clone() for e in model.get_submodule(name).experts] for name in BLOCKS}
    scores = expert_scores(model, batches(), "frequency")
    kept = prune_experts(model, 3, scores)
    loaded = reload(export(model, tmp_path))
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert loaded.config.num_local_experts == 3 and loaded.config.num_experts_per_tok == 2
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5
    assert torch.equal(greedy(loaded), greedy(model))
    for name in BLOCKS:
        stacked = loaded.get_submodule(name).experts.down_proj  # (3, D, H)
        assert torch.equal(stacked, torch.stack([down[name][i] for i in kept[name]]))


def test_layers_of_different_expert_counts_are_refused_by_export_and_reload_with_moefy(tmp_path, caplog):
    model = from_hf(hf_model("qwen3_moe"))
    with caplog.at_level(logging.WARNING, logger="moefy.compress"):
        kept = prune_experts(model, {BLOCKS[0]: 3, BLOCKS[1]: 4}, expert_scores(model, batches(), "frequency"))
    assert [len(kept[name]) for name in BLOCKS] == [3, 4]
    assert model.config.num_experts == 4  # no count fits both layers: the largest, and said so
    assert "(model.layers.0.mlp: 3, model.layers.1.mlp: 4); config.num_experts is the largest, 4" in caplog.text
    per_layer = r"different expert counts \(model\.layers\.0\.mlp: 3, model\.layers\.1\.mlp: 4\)"
    with pytest.raises(ValueError, match=per_layer + r"; Qwen3Moe has one expert count per model \(config\."
                                                     r"num_experts\)"):
        export(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # save_pretrained (moefy.save's format) keeps each layer's count: moefy.hf.load builds 3 and 4 experts again
    model.save_pretrained(tmp_path / "saved")
    loaded = moefy.hf.load(tmp_path / "saved")
    assert [loaded.get_submodule(name).num_experts for name in BLOCKS] == [3, 4]
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5

    prune_experts(model, 3, expert_scores(model, batches(), "frequency"))  # every layer the same: the config follows
    assert model.config.num_experts == 3
    model.save_pretrained(tmp_path / "saved3")
    assert (logits(moefy.hf.load(tmp_path / "saved3")) - logits(model)).abs().max() < 1e-5
    assert reload(export(model, tmp_path / "export")).config.num_experts == 3


def test_moefied_llama_with_different_counts_is_refused_before_writing(tmp_path):
    cfg = transformers.LlamaConfig(**{k: v for k, v in SMALL.items() if k != "num_experts_per_tok"})
    model = moefy.moefy(transformers.LlamaForCausalLM(cfg), num_experts=4, k=2, target="mlp", expert_noise=0.2)
    prune_experts(model, [4, 3], {name: torch.arange(4.0) for name in BLOCKS})
    with pytest.raises(ValueError, match=r"different expert counts \(model\.layers\.0\.mlp: 4, model\.layers\.1\.mlp: "
                                         r"3\); Mixtral has one expert count per model \(config\.num_local_experts\)"):
        export(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_writes_the_blocks_count_where_the_config_was_not_synced(tmp_path):
    """resize_block alone leaves config.num_local_experts at 8: export writes the blocks' 4, the model's config
    is not changed."""
    model = from_hf(hf_model("mixtral"))
    for name in BLOCKS:
        resize_block(model.get_submodule(name), [1, 3, 4, 6])
    assert model.config.num_local_experts == E
    loaded = reload(export(model, tmp_path))
    assert loaded.config.num_local_experts == 4 and model.config.num_local_experts == E
    assert (logits(loaded) - logits(model)).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["prune", "merge"])
def test_expert_tensors_in_the_safetensors_file_shrink_to_kept_over_E(how, tmp_path):
    model = from_hf(hf_model("qwen2_moe"))
    export(model, tmp_path / "full")
    data = batches()
    scores = expert_scores(model, data, "soft")
    if how == "prune":
        prune_experts(model, 3, scores)
    else:
        merge_experts(model, 3, scores, data)
    export(model, tmp_path / "small")
    full, full_data = tensor_bytes(tmp_path / "full")
    small, small_data = tensor_bytes(tmp_path / "small")
    experts = lambda sizes: sum(n for k, n in sizes.items() if ".mlp.experts." in k)  # noqa: E731
    routers = lambda sizes: sum(n for k, n in sizes.items() if k.endswith(".mlp.gate.weight"))  # noqa: E731
    # float32 gate / up (32, 32) and down (32, 32) per expert and layer; the router (E, 32) per layer
    assert experts(full) == 4 * E * 3 * 32 * 32 * len(BLOCKS) and routers(full) == 4 * E * 32 * len(BLOCKS)
    assert experts(small) * E == experts(full) * 3 and routers(small) * E == routers(full) * 3
    rest = lambda sizes: {k: n for k, n in sizes.items() if ".mlp.experts." not in k and  # noqa: E731
                          not k.endswith(".mlp.gate.weight")}
    assert rest(small) == rest(full) and len(rest(full)) > 10  # embeddings, attention, shared expert: as they were
    assert full_data - small_data == (experts(full) + routers(full)) * (E - 3) // E
