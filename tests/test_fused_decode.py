"""Decoding with fused SwiGLU experts (issue 24, speed): a few rows per expert without grad run transposed
(``moefy.dispatch.fused._swiglu_transposed``; one token: ``_swiglu_one_row_each``) with the loop's outputs; the wrapper check reads only the experts that
run and sees hooks / replaced forwards / replaced modules added at any time; ``from_hf`` runs fused by default, also
on the meta device (``moefy.load``'s dry run); ``fastpaths.all_finite``."""
import pytest
import torch
from torch import nn

import moefy
import moefy.dispatch.fused as fused_module
from conftest import SwiGLUMixture
from moefy.dispatch.fused import SWIGLU
from moefy.fastpaths import all_finite

D, H, E = 8, 12, 16


def pair(k=2, **options):
    torch.manual_seed(0)
    looped = SwiGLUMixture(D, H, E, k=k, **options).double().eval()
    fused = SwiGLUMixture(D, H, E, k=k, fused=True, **options).double().eval()
    fused.load_state_dict(looped.state_dict())
    return looped, fused


@pytest.fixture
def decode_calls(monkeypatch):
    """The decoding paths called: ("transposed", sizes) / ("one row each", A)."""
    calls = []
    transposed, one_row_each = fused_module._swiglu_transposed, fused_module._swiglu_one_row_each
    monkeypatch.setattr(fused_module, "_swiglu_transposed", lambda x, experts, sizes: calls.append(
        ("transposed", sizes)) or transposed(x, experts, sizes))
    monkeypatch.setattr(fused_module, "_swiglu_one_row_each", lambda x, experts: calls.append(
        ("one row each", x.shape[0])) or one_row_each(x, experts))
    return calls


@pytest.mark.parametrize("tokens,k", [(1, 1), (1, 4), (3, 2), (16, 2), (40, 4)])
def test_decoding_runs_transposed_and_equals_the_loop(tokens, k, decode_calls):
    looped, fused = pair(k)
    x = torch.randn(tokens, D, dtype=torch.float64)
    with torch.no_grad():
        want, got = looped(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert fused.routing.counts == looped.routing.counts
    sizes = [n for n in fused.routing.counts[:E] if n]  # every expert with rows, in expert order
    assert sum(sizes) == tokens * k
    assert decode_calls == ([("one row each", k)] if tokens == 1 else [("transposed", sizes)])


def test_many_rows_per_expert_or_grad_run_the_other_paths(decode_calls):
    looped, fused = pair()
    x = torch.randn(400, D, dtype=torch.float64)  # 800 rows over 16 experts: 50 each on average
    with torch.no_grad():
        torch.testing.assert_close(fused(x), looped(x))
    torch.testing.assert_close(fused(x[:1]), looped(x[:1]))  # with grad
    assert decode_calls == []


def one_token_step():
    """A fused pair at k=1 after one decoding step: ``(looped, fused, x (1, D), fused(x), the expert x went to)``."""
    looped, fused = pair(k=1)
    x = torch.randn(1, D, dtype=torch.float64)
    with torch.no_grad():
        y = fused(x)
    return looped, fused, x, y, fused.routing.indices.item()


def test_a_hook_added_between_decoding_steps_takes_effect():
    # the first step is a clean check: the hook dicts are not read again until a hook is registered somewhere
    looped, fused, x, before, e = one_token_step()
    with torch.no_grad():
        handles = [m.experts[e].down_proj.register_forward_hook(lambda mod, args, out: out * 3)
                   for m in (looped, fused)]
        torch.testing.assert_close(fused(x), 3 * before)  # k=1: the one expert's output, weight 1
        torch.testing.assert_close(fused(x), looped(x))
        for h in handles:
            h.remove()
        torch.testing.assert_close(fused(x), before)


def test_a_forward_replaced_on_a_running_expert_takes_effect():
    looped, fused, x, _, e = one_token_step()
    with torch.no_grad():
        for m in (looped, fused):
            up = m.experts[e].up_proj
            up.forward = lambda t, up=up: nn.functional.linear(t, up.weight) + 1.0
        torch.testing.assert_close(fused(x), looped(x))


def test_a_replaced_expert_is_vetted_again_when_it_runs():
    looped, fused, x, _, e = one_token_step()
    with torch.no_grad():
        idle = (e + 1) % E
        for m in (looped, fused):  # an idle expert replaced by a module of another class: not read while idle
            torch.manual_seed(1)
            m.experts[idle] = nn.Sequential(nn.Linear(D, D)).double()
        torch.testing.assert_close(fused(x), looped(x))
        for m in (looped, fused):  # route every token to the replaced expert
            m.router.gate.weight.zero_()
            m.router.gate.weight[idle] = 1.0
        x = x.abs() + 1
        torch.testing.assert_close(fused(x), looped(x))
        assert fused.routing.indices.item() == idle and fused._fused.layout is None  # vetted again: not fusable


def test_swiglu_experts_fuse_on_the_meta_device():
    from moefy.hf.block import HFMoEBlock
    with torch.device("meta"):
        block = HFMoEBlock(D, H, 4, "silu", fused=True)
    assert block._fused_layout == (SWIGLU,)


def test_all_finite():
    assert all_finite(torch.randn(3, 4)) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 4)
        x[1, 2] = bad
        assert not all_finite(x)
    assert not all_finite(torch.full((2,), 3e38).repeat(4))  # a sum that overflows reads as not finite
    assert not all_finite(torch.zeros(3, device="meta"))  # no free host read there: the per-row path
    assert all_finite(torch.randn(3, requires_grad=True))
