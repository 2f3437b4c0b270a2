"""Quick start (seed 000's blueprint_run): the sparsely-gated MoE layer on random data.

    python examples/quickstart.py [--steps 50] [--seed 0]

Prints train and eval loss and the auxiliary loss (cv² of importance + load, times loss_coef).
"""
import argparse

import torch
from torch import nn
from tqdm import tqdm

from moefy.recipes.sparse_moe import MoE


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    input_size, num_classes = 512, 10
    model = MoE(input_size=input_size, output_size=num_classes, num_experts=10, hidden_size=64, k=4,
                noisy_gating=True)
    x, y = torch.randn(args.batch, input_size), torch.randint(0, num_classes, (args.batch,))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()  # the experts return logits, so cross-entropy applies directly

    model.train()
    for _ in tqdm(range(args.steps), desc="train", leave=False):
        out, aux_loss = model(x)
        loss = loss_fn(out, y)
        optim.zero_grad()
        (loss + aux_loss).backward()
        optim.step()
    print(f"Training Results - loss: {loss.item():.3f}, aux_loss: {aux_loss.item():.5f}")

    model.eval()
    with torch.no_grad():
        out, eval_aux = model(x)
        eval_loss = loss_fn(out, y)
    print(f"Evaluation Results - loss: {eval_loss.item():.3f}, aux_loss: {eval_aux.item():.5f}")
    print(f"tokens per expert (eval): {model.routing.load.tolist()}")
    return {"train_loss": loss.item(), "train_aux": aux_loss.item(), "eval_loss": eval_loss.item(),
            "eval_aux": eval_aux.item()}


if __name__ == "__main__":
    main()
