import pytest
import torch
from torch import nn

from moefy import MoEBlock


class LinearMixture(MoEBlock):
    """The seed's CustomMoEBlock: a mixture of Linear experts."""

    def __init__(self, input_dim, output_dim, num_experts, *args, **kwargs):
        experts = [nn.Linear(input_dim, output_dim) for _ in range(num_experts)]
        super().__init__(input_dim=input_dim, experts=experts, *args, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


class RecordingMixture(LinearMixture):
    """Records the number of rows each expert call received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def expert_forward(self, expert, x):
        self.calls.append((expert.expert_id, x.shape[0]))
        return expert(x)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
