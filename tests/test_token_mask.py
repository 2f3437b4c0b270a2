"""Padding-aware routing: masked tokens are neither routed nor counted."""
import pytest
import torch

from moefy.observe.recorder import RoutingRecorder
from conftest import LinearMixture


@pytest.mark.parametrize("options", [
    dict(k=2, aux_criterion=["switch", "z", "entropy", "cv2"]),
    dict(k=1, hole=True, aux_criterion="balance", aggregation="mean"),
    dict(expert_choice=True, capacity_factor=1.5, aux_criterion="switch"),
])
def test_masked_tokens_are_not_routed(options):
    block = LinearMixture(6, 4, num_experts=4, **options).double().eval()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    mask = torch.rand(3, 7) > 0.4
    y = block(x, token_mask=mask)
    masked = block.routing
    losses = dict(block.aux_losses)
    y_ref = block(x[mask])
    ref = block.routing
    assert torch.all(y[~mask] == 0)
    torch.testing.assert_close(y[mask], y_ref)
    assert masked.num_tokens == int(mask.sum()) and masked.num_inputs == 21
    assert masked.counts == ref.counts and int(masked.dropped) == int(ref.dropped)
    kept = mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(masked.token_index, kept[ref.token_index])
    for name, value in losses.items():
        torch.testing.assert_close(value, block.aux_losses[name])


def test_mask_with_per_sample_routing_and_load_views():
    block = LinearMixture(4, 4, num_experts=3, k=1, route="samples")
    x = torch.randn(5, 6, 4)
    mask = torch.tensor([True, False, True, True, False])
    y = block(x, token_mask=mask)
    assert torch.all(y[~mask] == 0) and sum(block.routing.counts) == 3
    token_block = LinearMixture(4, 4, num_experts=3, k=2)
    tmask = torch.ones(5, 6, dtype=torch.bool)
    tmask[:, 4:] = False
    token_block(x, token_mask=tmask)
    load = token_block.experts_load()
    assert load.shape == (3, 6) and torch.all(load[:, 4:] == 0) and torch.all(load[:, :4].sum(0) == 10)


def test_recorder_skips_padding():
    block = LinearMixture(4, 4, num_experts=3, k=1)
    x, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    with RoutingRecorder(block) as rec:
        rec.labels = torch.tensor([0, 1])
        block(x, token_mask=mask)
    stats = next(iter(rec.stats.values()))
    assert stats.tokens == 7 and int(sum(stats.load)) == 7


def test_bad_masks():
    block = LinearMixture(4, 4, num_experts=3)
    with pytest.raises(TypeError, match="token_mask must be a bool tensor"):
        block(torch.randn(2, 4), token_mask=torch.ones(2))
    with pytest.raises(ValueError, match=r"token_mask must have the tokens' shape \(2,\)"):
        block(torch.randn(2, 4), token_mask=torch.ones(3, dtype=torch.bool))


def test_all_masked():
    block = LinearMixture(4, 4, num_experts=3, k=2, aux_criterion=["switch", "entropy", "z", "cv2", "balance"])
    y = block(torch.randn(2, 3, 4), token_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(y == 0) and y.shape == (2, 3, 4) and sum(block.routing.counts) == 0
    assert torch.isfinite(block.aux_loss)
