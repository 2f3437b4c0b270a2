"""Aux losses reach the gradient whoever runs the forward: plain, non-reentrant and reentrant activation
checkpointing (torch's and HF's), scaled losses, ``include_aux_loss``; no term counts twice."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moefy
from moefy import moefy as moefy_fn

CHECKPOINTING = ["plain", "non_reentrant", "reentrant"]


def _block(**options):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    options = {"num_experts": 4, "k": 2, "aux_criterion": {"switch": 0.5, "z": 0.1}, **options}
    return moefy_fn(mlp, expert_noise=0.1, **options).train()


def _step(block, x, mode, scale=1.0):
    """Gradients of ``scale * (task + moefy.aux_loss)`` with the block run as ``mode`` says."""
    block.zero_grad()
    if mode == "plain":
        y = block(x)
    else:
        y = checkpoint(block, x, use_reentrant=mode == "reentrant")
    aux = moefy.aux_loss(block)
    assert aux.requires_grad
    (scale * (y.square().mean() + aux)).backward()
    return {n: p.grad.clone() for n, p in block.named_parameters()}, aux.detach()


@pytest.mark.parametrize("mode", CHECKPOINTING)
@pytest.mark.parametrize("noise", [None, "gumbel", "gaussian"])
def test_checkpointed_block_trains_the_plain_gradient(mode, noise):
    block = _block(noise=noise)
    x = torch.randn(2, 16, 8, requires_grad=True)
    torch.manual_seed(1)
    plain, aux = _step(block, x, "plain")
    torch.manual_seed(1)
    got, got_aux = _step(block, x, mode)
    assert torch.equal(got_aux, aux)
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def test_aux_gradient_is_there_and_counted_once():
    """Reentrant: the router's gradient is the task's plus the aux loss's, once (not zero, not twice)."""
    block = _block()
    x = torch.randn(32, 8, requires_grad=True)
    with_aux, _ = _step(block, x, "reentrant")
    block.zero_grad()
    y = block(x)
    y.square().mean().backward()
    task = block.router.gate.weight.grad.clone()
    block.zero_grad()
    block(x)
    moefy.aux_loss(block).backward()
    aux = block.router.gate.weight.grad.clone()
    assert aux.abs().sum() > 0
    torch.testing.assert_close(with_aux["router.gate.weight"], task + aux, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [0.25, 1024.0])
def test_scaled_loss_scales_the_aux_gradient_too(scale):
    """Gradient accumulation (loss / n) and loss scaling (loss * S) scale the aux term as without checkpointing."""
    block = _block()
    x = torch.randn(32, 8, requires_grad=True)
    plain, _ = _step(block, x, "plain", scale)
    got, _ = _step(block, x, "reentrant", scale)
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_unadded_aux_loss_trains_nothing_as_without_checkpointing():
    block = _block()
    x = torch.randn(32, 8, requires_grad=True)
    block(x).square().mean().backward()
    plain = block.router.gate.weight.grad.clone()
    block.zero_grad()
    checkpoint(block, x, use_reentrant=True).square().mean().backward()
    torch.testing.assert_close(block.router.gate.weight.grad, plain, rtol=1e-6, atol=1e-7)


def test_aux_loss_backpropagated_without_any_graph_warns(caplog):
    block = _block()
    with torch.no_grad():
        block(torch.randn(32, 8))
    aux = moefy.aux_loss(block)
    with caplog.at_level(logging.WARNING, logger="moefy.routing.aux_gradient"):
        aux.backward()
    assert block.router.gate.weight.grad is None
    assert "no recomputation of that forward ran" in caplog.text


def test_eval_and_inference_forwards_keep_a_plain_value():
    block = _block().eval()
    with torch.no_grad():
        block(torch.randn(32, 8))
    assert not block.aux_loss.requires_grad
    block.train()
    with torch.inference_mode():
        block(torch.randn(32, 8))
    assert not block.aux_loss.requires_grad


def test_block_output_can_be_modified_in_place_after_a_recomputation():
    block = _block()
    x = torch.randn(32, 8, requires_grad=True)

    def run(inp):
        y = block(inp)
        y += 1.0
        return y

    out = checkpoint(run, x, use_reentrant=True)
    (out.square().mean() + moefy.aux_loss(block)).backward()
    assert block.router.gate.weight.grad.abs().sum() > 0


def test_copies_and_pickles_drop_pending_probes():
    import pickle
    block = _block()
    with torch.no_grad():
        block(torch.randn(32, 8))
    clone = pickle.loads(pickle.dumps(block))
    assert not clone.aux_loss.requires_grad
    copy.deepcopy(block)(torch.randn(4, 8))


def test_model_aux_loss_keeps_float64():
    block = _block().double()
    block(torch.randn(32, 8, dtype=torch.float64))
    total = moefy.aux_loss(block)
    assert total.dtype == torch.float64 and torch.equal(total, block.aux_loss)


# ----------------------------------------------------------------------- Hugging Face: gradient checkpointing

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    moefy_fn(model, num_experts=4, k=2, target="mlp", expert_noise=0.1, aux_criterion={"switch": 0.01})
    return model.train()


def _hf_grads(model, ids, checkpointing, use_hook):
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    handle = moefy.hf.include_aux_loss(model) if use_hook else None
    out = model(input_ids=ids, labels=ids)
    loss = out.loss if use_hook else out.loss + moefy.aux_loss(model)
    loss.backward()
    if handle is not None:
        handle.remove()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("use_hook", [False, True], ids=["aux_loss", "include_aux_loss"])
def test_hf_gradient_checkpointing_trains_the_aux_loss(checkpointing, use_hook):
    ids = torch.randint(0, 64, (2, 12))
    plain = _hf_grads(_llama(), ids, None, use_hook)
    got = _hf_grads(_llama(), ids, checkpointing, use_hook)
    routers = [n for n in plain if "router.gate" in n]
    assert len(routers) == 2 and set(got) == set(plain)
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)

