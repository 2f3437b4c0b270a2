"""Quick start (seed 000's blueprint_run): a mixture of MLP experts on random data.

    python examples/quickstart.py [--steps 100]

Prints train and eval loss and the auxiliary loss.
"""
import argparse

import torch
from torch import nn

from moefy import MoEBlock


class MLPMixture(MoEBlock):
    def __init__(self, input_dim: int, output_dim: int, hidden: int, num_experts: int, **routing):
        experts = [nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, output_dim))
                   for _ in range(num_experts)]
        super().__init__(experts=experts, input_dim=input_dim, **routing)

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    dim, classes, batch = 512, 10, 256
    model = MLPMixture(dim, classes, hidden=64, num_experts=10, k=4, noise="gaussian", aux_criterion="cv2")
    x, y = torch.randn(batch, dim), torch.randint(0, classes, (batch,))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    for _ in range(args.steps):
        loss = loss_fn(model(x), y)
        optim.zero_grad()
        (loss + 1e-2 * model.aux_loss).backward()
        optim.step()
    print(f"Training Results - loss: {loss.item():.2f}, aux_loss: {model.aux_loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        loss = loss_fn(model(x), y)
    print(f"Evaluation Results - loss: {loss.item():.2f}, aux_loss: {model.aux_loss.item():.3f}")


if __name__ == "__main__":
    main()
