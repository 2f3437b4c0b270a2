"""What wraps a module keeps working: PEFT LoRA (real ``peft``) on the router's gate and on the experts of fused
mixtures, and hooks / parametrizations added to fused experts after construction.

- a fused mixture runs its experts looped while something wraps them (one warning), so the adapter takes effect:
  the same outputs, LoRA gradients and trained adapters as the looped mixture with the same adapter; fused again
  after ``merge_and_unload``;
- the router calls a wrapped gate as a module: its LoRA gets gradients, ``merge_and_unload`` keeps the logits,
  and the math stays float32 in a bf16 model and under autocast;
- ``target_modules="all-linear"`` on a moefied tiny Llama and on ``moefy.hf.from_hf(mixtral, fused=True)``;
  ``moefy.hf.export`` refuses an unmerged adapter by name.
"""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import moefy
from moefy.hf.block import SwiGLU

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DIM = 16
EXPERTS = {
    "linear": (lambda: nn.Linear(DIM, DIM), r".*experts\.\d+"),
    "mlp": (lambda: nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Linear(32, DIM)), r".*experts\.\d+\.[02]"),
    "swiglu": (lambda: SwiGLU(DIM, 24), r".*experts\.\d+\.(gate|up|down)_proj"),
}


class Mixture(moefy.MoEBlock):
    def expert_forward(self, expert, x):
        return expert(x)


class Net(nn.Module):
    """A model around one mixture (PEFT wraps a model)."""

    def __init__(self, make, fused, num_experts=4, **options):
        super().__init__()
        self.moe = Mixture([make() for _ in range(num_experts)], DIM, k=2, fused=fused, **options)

    def forward(self, x):
        return self.moe(x)


def pair(kind, **options):
    """The same weights twice: looped and fused=True."""
    torch.manual_seed(0)
    looped = Net(EXPERTS[kind][0], False, **options)
    fused = Net(EXPERTS[kind][0], True, **options)
    fused.load_state_dict(looped.state_dict())
    return looped, fused


def with_lora(models, targets, autocast_adapter_dtype=True, **config):
    """The same LoRA adapter (random A and B unless ``init_lora_weights`` is given) on every model."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **config}
    adapted = [peft.get_peft_model(m, peft.LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
               for m in models]
    for m in adapted[1:]:
        m.load_state_dict(adapted[0].state_dict())
    return adapted


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def train(model, batches, loss_fn, lr=0.1):
    """SGD on the trainable (LoRA) parameters; the loss and the LoRA gradients of every step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        history.append((loss.detach(), lora_grads(model)))
        opt.step()
    return history


def assert_same_training(got, want):
    for (loss_g, grads_g), (loss_w, grads_w) in zip(got, want):
        torch.testing.assert_close(loss_g, loss_w)
        assert grads_g.keys() == grads_w.keys() and grads_g
        for name in grads_w:
            torch.testing.assert_close(grads_g[name], grads_w[name], msg=name)


def mse(model, batch):
    x, target = batch
    return (model(x) - target).square().mean()


def batches(n=3, tokens=48):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(tokens, DIM, generator=g), torch.randn(tokens, DIM, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", EXPERTS)
def test_lora_on_fused_experts_trains_as_on_looped_ones(kind, caplog):
    looped, fused = pair(kind)
    targets = EXPERTS[kind][1]
    looped, fused = with_lora([looped, fused], targets, init_lora_weights=True)  # lora_B starts at 0
    x = batches(1)[0][0]
    with caplog.at_level(logging.WARNING, logger="moefy"):
        want, got = train(looped, batches(), mse), train(fused, batches(), mse)
    assert_same_training(got, want)
    warned = [r.getMessage() for r in caplog.records if "fused=True" in r.getMessage()]
    assert len(warned) == 1 and "peft" in warned[0] and "looped" in warned[0]
    trained = {n: p for n, p in fused.named_parameters() if "lora_B" in n}
    assert trained and all(p.abs().max() > 1e-4 for p in trained.values())  # it trained: no longer 0
    for name, p in looped.named_parameters():
        torch.testing.assert_close(dict(fused.named_parameters())[name], p, msg=name)
    with torch.no_grad():
        adapted = fused(x)
        with fused.disable_adapter():
            plain = fused(x)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("kind", EXPERTS)
def test_merged_lora_runs_fused_again_with_the_adapted_outputs(kind):
    looped, fused = with_lora(pair(kind), EXPERTS[kind][1])
    x = batches(1)[0][0]
    with torch.no_grad():
        adapted = fused(x)
        torch.testing.assert_close(adapted, looped(x))
        assert not fused.base_model.model.moe._fused.fusable()
        merged = fused.merge_and_unload()
        assert merged.moe._fused.fusable()  # plain nn.Linear experts again: the fused pass runs
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)


def double(module, args, out):
    return out * 2


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


WRAPPERS = {  # name: wrap the fused experts in place after construction; returns what undoes it
    "forward hook": lambda experts: experts[1][0].register_forward_hook(double).remove,
    "hook on an expert": lambda experts: experts[2].register_forward_hook(double).remove,
    "pre-hook": lambda experts: experts[3][2].register_forward_pre_hook(lambda m, a: (a[0] * 3,)).remove,
    "parametrization": lambda experts: (
        parametrize.register_parametrization(experts[0][2], "weight", Doubled()),
        lambda: parametrize.remove_parametrizations(experts[0][2], "weight", leave_parametrized=False))[1],
    "global hook": lambda experts: nn.modules.module.register_module_forward_hook(
        lambda m, a, out: out * 2 if isinstance(m, nn.Linear) and m.out_features == 32 else None).remove,
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_hooks_and_parametrizations_added_later_take_effect_fused(wrapper):
    looped, fused = pair("mlp")
    x = batches(1)[0][0].requires_grad_(True)
    with torch.no_grad():
        before = fused(x)
    undo = [WRAPPERS[wrapper](m.moe.experts) for m in (looped, fused)]
    try:
        want, got = looped(x), fused(x)
        torch.testing.assert_close(got, want)
        assert (got - before).abs().max() > 1e-3
        g = torch.randn_like(want)
        params = lambda m: [x, *m.moe.experts.parameters()]  # noqa: E731
        for a, b in zip(torch.autograd.grad(got, params(fused), g), torch.autograd.grad(want, params(looped), g)):
            torch.testing.assert_close(a, b)
    finally:
        for u in undo:
            u()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before)  # unwrapped: fused again, as before
    assert fused.moe._fused.fusable()


def test_router_lora_trains_and_merges_exactly():
    torch.manual_seed(0)
    (model,) = with_lora([Net(EXPERTS["mlp"][0], False)], ["gate"], init_lora_weights=True)
    assert type(model.base_model.model.moe.router.gate).__module__.startswith("peft")
    x, target = batches(1)[0]
    mse(model, (x, target)).backward()
    grad_b = next(p.grad for n, p in model.named_parameters() if "router.gate.lora_B" in n)
    assert grad_b is not None and grad_b.norm() > 1e-4  # lora_B starts at 0: its gradient is the first to move

    torch.manual_seed(0)
    (model,) = with_lora([Net(EXPERTS["mlp"][0], False)], ["gate"])  # random A and B
    block = model.base_model.model.moe
    with torch.no_grad():
        model(x)
        adapted = block.routing.logits
        with model.disable_adapter():
            model(x)
        assert (block.routing.logits - adapted).abs().max() > 0.1
        merged = model.merge_and_unload()
        merged(x)
    assert type(merged.moe.router.gate) is nn.Linear
    torch.testing.assert_close(merged.moe.routing.logits, adapted)


@pytest.mark.parametrize("noise", [None, "jitter"])
def test_router_lora_in_a_bf16_model_routes_in_float32(noise):
    """bf16 gate and adapter: the logits are the float32 product with the float32 adapted weight (not bf16 math),
    with and without autocast; jitter's second gate call runs through the adapter too."""
    torch.manual_seed(0)
    net = Net(EXPERTS["mlp"][0], False, noise=noise).to(torch.bfloat16)
    (model,) = with_lora([net], ["gate"], autocast_adapter_dtype=False)
    gate = model.base_model.model.moe.router.gate
    assert gate.lora_A["default"].weight.dtype == torch.bfloat16
    x = batches(1, tokens=256)[0][0].to(torch.bfloat16)
    w = gate.base_layer.weight.float() + gate.scaling["default"] * (
        gate.lora_B["default"].weight.float() @ gate.lora_A["default"].weight.float())  # (E, D) in float32
    want = x.float() @ w.t()
    block = model.base_model.model.moe
    for autocast in (False, True):
        torch.manual_seed(2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)
        assert block.routing.logits.dtype == torch.float32
        torch.testing.assert_close(block.routing.logits, want, rtol=1e-5, atol=1e-5)
    if noise == "jitter":  # training: the jittered input goes through the adapted gate
        model.train()
        torch.manual_seed(3)
        jitter = torch.empty(x.shape).uniform_(1 - block.router.jitter_eps, 1 + block.router.jitter_eps)
        torch.manual_seed(3)
        with torch.no_grad():
            model(x)
        torch.testing.assert_close(block.routing.noisy_logits, (x.float() * jitter) @ w.t(), rtol=1e-5, atol=1e-5)


LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def token_batches(n=2):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


def test_all_linear_lora_on_a_moefied_llama_fused_equals_looped():
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
        models.append(moefy.moefy(dense, 4, k=2, target="mlp", fused=fused, expert_noise=0.1))
    models[1].load_state_dict(models[0].state_dict())
    looped, fused = with_lora(models, "all-linear", init_lora_weights=True)
    wrapped = [n for n, m in fused.named_modules() if type(m).__module__.startswith("peft") and "mlp" in n]
    assert any(n.endswith("router.gate") for n in wrapped) and any(n.endswith("experts.3.down_proj") for n in wrapped)
    want, got = train(looped, token_batches(), lm_loss), train(fused, token_batches(), lm_loss)
    assert_same_training(got, want)
    router_b = {n: g for n, g in got[0][1].items() if "router.gate.lora_B" in n}
    expert_b = {n: g for n, g in got[0][1].items() if "experts.1.up_proj.lora_B" in n}
    assert len(router_b) == len(expert_b) == 2 and all(g.norm() > 0 for g in [*router_b.values(),
                                                                               *expert_b.values()])


MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def mixtral(fused=False):
    torch.manual_seed(0)
    return moefy.hf.from_hf(transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)), fused=fused)


def test_all_linear_lora_on_from_hf_mixtral_fused_equals_looped():
    looped, fused = with_lora([mixtral(), mixtral(fused=True)], "all-linear")
    ids = token_batches(1)[0]
    with torch.no_grad():
        adapted = fused(ids).logits
        with fused.disable_adapter():
            assert (fused(ids).logits - adapted).abs().max() > 0.05
    want, got = train(looped, token_batches(), lm_loss), train(fused, token_batches(), lm_loss)
    assert_same_training(got, want)
    merged = fused.merge_and_unload()
    with torch.no_grad():
        after = merged(ids).logits
    assert all(b._fused.fusable() for b in moefy.moe_blocks(merged))
    with torch.no_grad():
        torch.testing.assert_close(after, copy.deepcopy(looped).merge_and_unload()(ids).logits, rtol=1e-4,
                                   atol=1e-4)


def test_export_refuses_an_unmerged_router_adapter_and_writes_the_merged_one(tmp_path):
    """A LoRA on the router alone: export would write the gate's base weight (other logits); it names the fix."""
    (adapted,) = with_lora([mixtral()], ["gate"])
    ids = token_batches(1)[0]
    with torch.no_grad():
        want = adapted(ids).logits
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.router\.gate .*PEFT.*merge_and_unload"):
        moefy.hf.export(adapted.base_model.model, tmp_path / "adapted")
    moefy.hf.export(adapted.merge_and_unload(), tmp_path / "merged")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-5)
