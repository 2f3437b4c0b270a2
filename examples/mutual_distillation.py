"""Seed 003: MoE against MoDE (mutual distillation among the experts, arXiv 2402.00893) on real images.

    python examples/mutual_distillation.py [--seeds 0 1 2] [--epochs 4] [--train-size 10000] [--alpha 0.5]

For every seed both models start from the same weights and see the same batches: a sparsely-gated MoE of
MLP experts on flat pixels (moefy.recipes.sparse_moe.MoE, top-k of E, noisy gate, cv² loss). MoE trains on
``CE + aux``; MoDE on ``(1 − α) · CE + α · L_KD + aux``, where L_KD pulls every expert towards the others'
temperature-softened predictions on every sample of the batch (moefy.recipes.distill). Prints both test accuracies
per seed side by side, and their mean ± standard deviation over the seeds.
"""
import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moefy.data import load_images
from moefy.recipes.distill import block_distillation_loss, mode_loss
from moefy.recipes.metrics import accuracy
from moefy.recipes.sparse_moe import MoE


def train_and_test(data, seed: int, distill: bool, args) -> float:
    torch.manual_seed(seed)  # same initial weights for MoE and MoDE
    model = MoE(data.train_x[0].numel(), data.num_classes, num_experts=args.num_experts, hidden_size=args.hidden,
                k=args.k, noisy_gating=True)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)  # same batches
    noise = torch.Generator().manual_seed(seed)
    name = "MoDE" if distill else "MoE"
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(data.train_y), generator=gen)
        for i in tqdm(range(0, len(order), args.batch), desc=f"seed {seed} {name} epoch {epoch + 1}", leave=False):
            idx = order[i:i + args.batch]
            x, y = data.train_x[idx].flatten(1), data.train_y[idx]
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=noise)))  # same gate noise too
            out, aux_loss = model(x)
            loss = F.cross_entropy(out, y)
            if distill:
                loss = mode_loss(loss, block_distillation_loss(model, x, args.temperature), args.alpha)
            optim.zero_grad()
            (loss + aux_loss).backward()
            optim.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(data.test_x[i:i + 1000].flatten(1))[0] for i in range(0, len(data.test_y), 1000)])
    return accuracy(logits, data.test_y)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="IDX or CIFAR-10 directory (default: Fashion-MNIST)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=10000, help="random training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5, help="MoDE: weight of the distillation loss")
    parser.add_argument("--temperature", type=float, default=2.0, help="MoDE: distillation temperature")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = load_images(args.data_dir).subset(args.train_size or None, args.test_size, seed=0)
    print(f"data: {data.name}: {len(data.train_y)} train / {len(data.test_y)} test images {data.image_shape}")
    print(f"{args.num_experts} experts, k={args.k}, hidden {args.hidden}, {args.epochs} epochs; "
          f"MoDE alpha={args.alpha}, T={args.temperature}")
    print(f"{'seed':>4}  {'MoE acc %':>9}  {'MoDE acc %':>10}  {'MoDE - MoE':>10}")
    results = {"moe": [], "mode": []}
    start = time.time()
    for seed in args.seeds:
        results["moe"].append(train_and_test(data, seed, False, args))
        results["mode"].append(train_and_test(data, seed, True, args))
        moe, mode = results["moe"][-1], results["mode"][-1]
        print(f"{seed:>4}  {100 * moe:9.2f}  {100 * mode:10.2f}  {100 * (mode - moe):+10.2f}")

    def spread(v):
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    (m_moe, s_moe), (m_mode, s_mode) = spread(results["moe"]), spread(results["mode"])
    diff = [b - a for a, b in zip(results["moe"], results["mode"])]
    m_diff, s_diff = spread(diff)
    print(f"mean  {100 * m_moe:6.2f}±{100 * s_moe:.2f}  {100 * m_mode:7.2f}±{100 * s_mode:.2f}  "
          f"{100 * m_diff:+7.2f}±{100 * s_diff:.2f}   (± = std over {len(args.seeds)} seeds; {time.time() - start:.0f} s)")
    return {"moe": results["moe"], "mode": results["mode"]}


if __name__ == "__main__":
    main()
