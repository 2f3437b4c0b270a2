"""moefy.hf.export: a moefied Llama / Mistral / Qwen2 / Qwen3 as a native transformers MoE checkpoint.

``AutoModelForCausalLM.from_pretrained(folder)`` loads it as Mixtral / Qwen2-MoE / Qwen3-MoE and its logits equal
the moefied model's (float32), before and after training steps; what the target cannot express is refused with
the option and the architecture named. Small configs, random weights, no download.
"""
import pytest
import torch

import moefy

transformers = pytest.importorskip("transformers", reason="moefy.hf needs the transformers package")
from moefy.hf import export  # noqa: E402

VOCAB = 64


def dense(name, **extra):
    """A small dense causal LM of family ``name``: 3 layers, hidden 16, random weights."""
    cfg = getattr(transformers, f"{name}Config")(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                 **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(cfg)


def train(model, steps=3):
    """A few Adam steps on random tokens with the aux losses, so routers and experts move apart."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 9))
        loss = model(ids, labels=ids).loss + moefy.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def reload(model, folder):
    export(model, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def max_error(a, b, ids):
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


CASES = {
    "llama->mixtral": ("Llama", "MixtralForCausalLM", {}, {}),
    "mistral->mixtral": ("Mistral", "MixtralForCausalLM", {}, {}),
    "qwen2->qwen2-moe (gated shared)": ("Qwen2", "Qwen2MoeForCausalLM", {}, {"num_shared": 1, "shared_gate": True}),
    "qwen2->qwen2-moe (no shared)": ("Qwen2", "Qwen2MoeForCausalLM", {}, {"normalize": False}),
    "qwen3->qwen3-moe": ("Qwen3", "Qwen3MoeForCausalLM", {}, {"normalize": False}),
}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_as_the_moe_class_with_equal_logits_after_training(case, tmp_path):
    name, target, extra, options = CASES[case]
    model = moefy.moefy(dense(name, **extra), 4, k=2, target="mlp", expert_noise=0.2,
                        aux_criterion={"switch": 0.01}, **options)
    train(model)
    loaded = reload(model, tmp_path)
    assert type(loaded).__name__ == target
    ids = torch.randint(0, VOCAB, (3, 11))
    assert max_error(model, loaded, ids) < 1e-5
    cfg = loaded.config
    assert cfg.num_experts_per_tok == 2
    assert getattr(cfg, "num_local_experts", getattr(cfg, "num_experts", None)) == 4
    # the reloaded experts are the trained ones, not a fresh initialisation
    mine = model.model.layers[1].mlp.experts[3].down_proj.weight
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj[3], mine)


def test_qwen3_partial_moefication_keeps_dense_layers_as_mlp_only_layers(tmp_path):
    model = moefy.moefy(dense("Qwen3"), 4, k=2, target="layers.1.mlp", expert_noise=0.2)
    loaded = reload(model, tmp_path)
    assert loaded.config.mlp_only_layers == [0, 2]
    assert type(loaded.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert type(loaded.model.layers[1].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert max_error(model, loaded, torch.randint(0, VOCAB, (2, 7))) < 1e-5


def test_qwen2_shared_copies_become_one_shared_expert(tmp_path):
    """Two shared copies of hidden 32 are one Qwen2-MoE shared expert of hidden 64 (a SwiGLU sums its units)."""
    model = moefy.moefy(dense("Qwen2"), 4, k=2, target="mlp", num_shared=2, shared_gate=True, expert_noise=0.1)
    loaded = reload(model, tmp_path)
    assert loaded.config.shared_expert_intermediate_size == 64
    assert max_error(model, loaded, torch.randint(0, VOCAB, (2, 7))) < 1e-5


REFUSED = {
    "hole": ({"hole": True}, "hole=True"),
    "expert choice": ({"expert_choice": True, "k": None}, "expert_choice=True"),
    "gumbel noise": ({"noise": "gumbel"}, "noise='gumbel'"),
    "no renormalisation": ({"normalize": False}, "normalize=False"),
    "sigmoid scores": ({"score_func": "sigmoid"}, "score_func='sigmoid'"),
    "token capacity": ({"token_capacity_factor": 1.25}, "token_capacity_factor=1.25"),
    "temperature": ({"temperature": 2.0}, "temperature=2.0"),
    "null experts": ({"null_experts": {"zero": 1}}, "null_experts="),
    "selection bias": ({"selection_bias": True}, "selection_bias=True"),
    "shared experts": ({"num_shared": 1}, "num_shared=1"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_options_mixtral_cannot_express_are_refused_by_name(case, tmp_path):
    options, message = REFUSED[case]
    k = options.pop("k", 2)
    model = moefy.moefy(dense("Llama"), 4, k=k, target="mlp", **options)
    with pytest.raises(ValueError, match=f"{message}.*Mixtral|Mixtral.*{message}"):
        export(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_what_the_architecture_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"layers \[0, 2\] keep a dense MLP; Mixtral has a mixture in every layer"):
        export(moefy.moefy(dense("Llama"), 4, k=2, target="layers.1.mlp"), tmp_path)
    with pytest.raises(ValueError, match="self_attn.q_proj.*not a decoder layer's MLP"):
        export(moefy.moefy(dense("Llama"), 4, k=2, target="q_proj"), tmp_path)
    with pytest.raises(ValueError, match="shared_gate=False cannot be exported to Qwen2Moe"):
        export(moefy.moefy(dense("Qwen2"), 4, k=2, target="mlp", num_shared=1), tmp_path)
    with pytest.raises(ValueError, match=r"Mixtral has no place for \['model.layers.0.self_attn.k_proj.bias"):
        export(moefy.moefy(dense("Llama", attention_bias=True), 4, k=2, target="mlp"), tmp_path)
    with pytest.raises(ValueError, match="no mixture to export"):
        export(dense("Llama"), tmp_path)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*no native Hugging Face MoE architecture"):
        export(moefy.moefy(gpt2, 4, k=2, target="mlp"), tmp_path)
    with pytest.raises(TypeError, match="folder must be a path"):
        export(moefy.moefy(dense("Llama"), 4, k=2, target="mlp"), 3)
    with pytest.raises(TypeError, match="model must be a transformers model"):
        export(torch.nn.Linear(2, 2), tmp_path)


def test_experts_with_another_activation_are_refused(tmp_path):
    model = moefy.moefy(dense("Llama"), 4, k=2, target="mlp")
    model.model.layers[0].mlp.experts[2].act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts.2: its activation GELU is not the Mixtral config's "
                                         r"hidden_act='silu'"):
        export(model, tmp_path)


UPCYCLINGS = {
    "fine-grained": lambda: moefy.moefy(dense("Llama"), 4, k=2, target="mlp", granularity=2),
    "drop-upcycling": lambda: moefy.moefy(dense("Llama"), 4, k=2, target="mlp", drop_fraction=0.5),
    "experts from several models": lambda: moefy.moefy(dense("Llama"), k=2, target="mlp", experts_from=[
        train(dense("Llama"), 1), train(dense("Llama"), 1)]),
    "informed router": lambda: moefy.moefy(dense("Llama"), 4, k=2, target="mlp", expert_noise=0.1,
                                           router_init="kmeans", router_data=[torch.randint(0, VOCAB, (4, 9))]),
}


@pytest.mark.parametrize("method", UPCYCLINGS)
def test_every_upcycling_method_exports_to_mixtral(method, tmp_path):
    model = UPCYCLINGS[method]().eval()
    loaded = reload(model, tmp_path)
    hidden = 16 if method == "fine-grained" else 32  # 2 slices of the 32 hidden neurons
    assert loaded.config.intermediate_size == hidden
    assert max_error(model, loaded, torch.randint(0, VOCAB, (3, 11))) < 1e-5


@pytest.mark.parametrize("head,auto,output", [("Model", "AutoModel", "last_hidden_state"),
                                              ("ForSequenceClassification", "AutoModelForSequenceClassification",
                                               "logits")])
def test_other_heads_export_to_their_mixtral_counterpart(head, auto, output, tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = moefy.moefy(getattr(transformers, f"Llama{head}")(cfg), 4, k=2, target="mlp", expert_noise=0.1).eval()
    export(model, tmp_path)
    loaded = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == f"Mixtral{head}"
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        assert (model(ids)[output] - loaded(ids)[output]).abs().max() < 1e-5
