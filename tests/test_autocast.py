"""The router runs in float32 under torch.autocast (CPU bfloat16 here; CUDA float16 / bfloat16 where a GPU is): the
same logits, noise and picks as the float32 forward of the same block on the same input, in every noise mode."""
import pytest
import torch
from torch import nn

import moefy


class Mixture(moefy.MoEBlock):
    def expert_forward(self, expert, x):
        return expert(x)


def block(noise=None, dim=64, num_experts=8, **options):
    torch.manual_seed(0)
    return Mixture([nn.Linear(dim, dim) for _ in range(num_experts)], dim, k=2, noise=noise, **options)


def picks(routing):
    """(T, E') bool: which columns each token went to."""
    chosen = torch.zeros(routing.probs.shape, dtype=torch.bool)
    assigned = routing.expert_index.numel()
    chosen[routing.token_index[:assigned], routing.expert_index] = True
    return chosen


def routed(mixture, x, device_type=None, dtype=None, seed=1):
    """The record of one forward, under autocast when ``device_type`` is given (same noise draws: same seed)."""
    torch.manual_seed(seed)
    with torch.no_grad(), torch.autocast(device_type or "cpu", dtype=dtype, enabled=device_type is not None):
        mixture(x)
    return mixture.routing


def assert_same_routing(got, want):
    assert got.logits.dtype == want.logits.dtype == torch.float32
    assert got.probs.dtype == torch.float32
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.noisy_logits, want.noisy_logits, rtol=0, atol=0)
    assert torch.equal(picks(got), picks(want))
    torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=0)


def test_eval_routing_under_cpu_bf16_autocast_equals_float32():
    """4,096 tokens: in bf16 the router would send 0.4 % of them (17) to other experts."""
    mixture = block().eval()
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(2))
    want = routed(mixture, x)
    got = routed(mixture, x, "cpu", torch.bfloat16)
    assert_same_routing(got, want)
    assert mixture(x).dtype == torch.float32  # outside autocast nothing changed


@pytest.mark.parametrize("noise", ["gaussian", "jitter", "gumbel", "simple"])
def test_training_noise_under_autocast_equals_float32(noise):
    """The noise network (gaussian's learned std) and the jittered second gate call run in float32 too."""
    mixture = block(noise).train()
    if noise == "gaussian":  # a non-zero std network, so its matmul matters
        nn.init.normal_(mixture.router.noise_std.weight, std=0.3)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
    want = routed(mixture, x)
    got = routed(mixture, x, "cpu", torch.bfloat16)
    assert_same_routing(got, want)
    if noise == "gaussian":
        assert got.noise_std.dtype == torch.float32
        torch.testing.assert_close(got.noise_std, want.noise_std, rtol=0, atol=0)


def test_bf16_model_under_autocast_routes_as_without():
    """A bf16 block on bf16 inputs: its router casts the weight to float32 with or without autocast."""
    mixture = block().eval().to(torch.bfloat16)
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert_same_routing(routed(mixture, x, "cpu", torch.bfloat16), routed(mixture, x))


def test_aux_loss_and_gradients_under_autocast():
    """Training under autocast: the aux loss is float32 and the router's gradient equals the float32 one."""
    mixture = block(aux_criterion={"switch": 0.01, "z": 0.001}).train()
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(5))
    grads = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            mixture(x)
        assert mixture.aux_loss.dtype == torch.float32
        grads.append(torch.autograd.grad(mixture.aux_loss, mixture.router.gate.weight)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_routes_in_float32(dtype):
    mixture = block("gaussian").cuda()
    nn.init.normal_(mixture.router.noise_std.weight, std=0.3)
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(2)).cuda()
    for mode in (mixture.eval, mixture.train):
        mode()
        want, got = routed(mixture, x), routed(mixture, x, "cuda", dtype)
        assert got.logits.dtype == torch.float32 and got.logits.device.type == "cuda"
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.noisy_logits, want.noisy_logits, rtol=0, atol=0)
        torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=0)
        assert torch.equal(got.expert_index, want.expert_index) and torch.equal(got.token_index, want.token_index)
