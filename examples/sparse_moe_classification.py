"""Seed 000's image-classification run (deepview.py) on real images: the sparsely-gated MoE on flat pixels.

    python examples/sparse_moe_classification.py [--epochs 2] [--data-dir DIR] [--train-size N]

Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist), or the
MNIST-style IDX files / CIFAR-10 python batches in --data-dir, else scikit-learn's 8x8 digits. Nothing is
downloaded. Prints the running loss, then test accuracy, NLL, ECE and the tokens each expert took.
"""
import argparse
import logging
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moefy.data import load_images
from moefy.recipes.metrics import classification_report
from moefy.recipes.sparse_moe import MoE


def evaluate(model: MoE, x: torch.Tensor, y: torch.Tensor, batch: int = 1000):
    model.eval()
    loads = torch.zeros(model.num_experts, dtype=torch.long)
    with torch.no_grad():
        logits = []
        for i in range(0, len(y), batch):
            logits.append(model(x[i:i + batch].flatten(1))[0])
            loads += model.routing.load
    return classification_report(torch.cat(logits).softmax(-1), y), loads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="IDX or CIFAR-10 directory (default: Fashion-MNIST)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-experts", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=None, help="train on a random subset")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    data = load_images(args.data_dir).subset(args.train_size, args.test_size, seed=args.seed)
    print(f"data: {data.name}: {len(data.train_y)} train / {len(data.test_y)} test images {data.image_shape}")
    input_size = data.train_x[0].numel()
    model = MoE(input_size=input_size, output_size=data.num_classes, num_experts=args.num_experts,
                hidden_size=args.hidden, k=args.k, noisy_gating=True)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(data.train_y), generator=gen)
        running, seen = 0.0, 0
        bar = tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch}", leave=False)
        for step, i in enumerate(bar, start=1):
            idx = order[i:i + args.batch]
            out, aux_loss = model(data.train_x[idx].flatten(1))
            loss = F.cross_entropy(out, data.train_y[idx])
            optim.zero_grad()
            (loss + aux_loss).backward()
            optim.step()
            running, seen = running + loss.item(), seen + 1
            if step % 100 == 0:
                print(f"[{epoch}, {step:5d}] loss: {running / seen:.3f}")
                running, seen = 0.0, 0
            bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux_loss.item():.4f}")
    print(f"Finished Training in {time.time() - start:.0f} s")

    report, loads = evaluate(model, data.test_x, data.test_y)
    print(f"Accuracy of the network on the {len(data.test_y)} test images: {100 * report['accuracy']:.2f} %")
    print(f"test NLL {report['nll']:.4f}, ECE (15 bins) {100 * report['ece']:.2f} %")
    print(f"test images per expert (k={args.k}): {loads.tolist()}")
    return dict(report, loads=loads.tolist(), data=data.name)


if __name__ == "__main__":
    main()
