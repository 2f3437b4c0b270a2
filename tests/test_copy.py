"""Copies of a model with mixtures (an EMA, a best checkpoint, an evaluation copy) after a training step."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moefy import aux_loss, moe_blocks, moefy


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + self.mlp(x))


def trained(fused: bool, **routing):
    model = moefy(TinyNet(), num_experts=4, k=2, target="mlp", aux_criterion="switch", expert_noise=0.1,
                  fused=fused, **routing)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(2):
        loss = F.cross_entropy(model(x), y) + aux_loss(model)
        optim.zero_grad()
        loss.backward()
        optim.step()
    model(x)  # a training forward whose graph is still held by the record
    return model


def roundtrips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buffer, weights_only=False)}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("routing", [{}, {"hole": True, "noise": "gaussian"}, {"expert_choice": True}])
def test_copies_after_a_training_step_compute_the_same(fused, routing):
    model = trained(fused, **routing)
    assert moe_blocks(model)[0].routing is not None and moe_blocks(model)[0].aux_loss.requires_grad
    x = torch.randn(16, 6)
    model.eval()
    want = model(x)
    for how, twin in roundtrips(model).items():
        twin.eval()
        block = moe_blocks(twin)[0]
        # the record is not state: a copy starts as if it had run no forward
        assert block.routing is None and block.aux_losses == {} and float(block.aux_loss) == 0, how
        assert float(aux_loss(twin)) == 0, how
        torch.testing.assert_close(twin(x), want, rtol=0, atol=0, msg=how)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), (how, name)
        # the copy trains on its own: a step changes its weights, not the original's
        before = moe_blocks(model)[0].router.gate.weight.clone()
        twin.train()
        F.cross_entropy(twin(x), torch.zeros(16, dtype=torch.long)).backward()
        assert moe_blocks(twin)[0].router.gate.weight.grad is not None
        assert torch.equal(moe_blocks(model)[0].router.gate.weight, before), how


def test_original_keeps_its_record_after_copy():
    model = trained(False)
    block = moe_blocks(model)[0]
    record, loss = block.routing, block.aux_loss
    copy.deepcopy(model)
    assert block.routing is record and block.aux_loss is loss
    loss.backward()  # the original's graph is intact
