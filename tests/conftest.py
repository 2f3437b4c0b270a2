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


class SwiGLU(nn.Module):
    """A SwiGLU FFN, ``down(silu(gate(x)) * up(x))``, bias-free: HF's ``DeepseekV3MLP`` / ``Qwen2MoeMLP``."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SwiGLUMixture(MoEBlock):
    """A mixture of E SwiGLU experts (and optional shared SwiGLU experts)."""

    def __init__(self, dim, hidden, num_experts, shared_hidden=(), **kwargs):
        super().__init__(experts=[SwiGLU(dim, hidden) for _ in range(num_experts)], input_dim=dim,
                         shared_experts=[SwiGLU(dim, h) for h in shared_hidden] or None, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


class ResidualMLPNet(nn.Module):
    """Two residual MLPs between an embedding and a head; x (B, L, 8) -> (B, L, 4). ``moefy(net, ...,
    target="blocks.*")`` turns the MLPs into mixtures."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
                                    for _ in range(2))
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.emb(x)  # (B, L, dim)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from more, and on a loaded machine the threads' spinning costs ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
