"""Does an informed router start help? Steps to a loss threshold from a random, a mean and a k-means router.

    python benchmarks/router_init.py                       # 5 seeds, 400 steps
    python benchmarks/router_init.py --seeds 2 --steps 20  # a quick look

The task: inputs ``x`` (D,) drawn around E cluster centres (E directions, std ``--spread``), and each cluster
has its own target function, ``y = tanh(W_c x)`` with a random ``W_c``. The model: a random MLP upcycled into E
copies with ``expert_noise=0.1``, top-1, Switch-style weights (``normalize=False``, so a random router gets
gradients and can learn the clusters too). Its router starts

- ``random``: as ``moefy`` makes it;
- ``mean``: ``init_router(..., "mean")`` on one labelled batch per cluster (expert i's data = cluster i);
- ``kmeans``: ``init_router(..., "kmeans")`` on one unlabelled batch.

All three train with Adam on the same batches. Printed: a markdown table with, per method, the median over
seeds of the first step whose held-out MSE is at most ``--threshold`` (``>N`` where half the seeds never get
there), and the median final held-out MSE.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import moefy  # noqa: E402
from moefy.convert import init_router  # noqa: E402

METHODS = ("random", "mean", "kmeans")


class Task:
    """E clusters in D dims, each with its own target ``tanh(W_c x)``; batches drawn from a seeded generator."""

    def __init__(self, dim: int, clusters: int, spread: float, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=self.gen))
        self.centres = 3.0 * q[:clusters]                                         # (E, D) orthogonal, norm 3
        self.maps = torch.randn(clusters, dim, dim, generator=self.gen) / math.sqrt(dim)  # (E, D, D)
        self.spread, self.clusters, self.dim = spread, clusters, dim

    def batch(self, n: int, cluster: Optional[int] = None):
        """(x (n, D), y (n, D)); all from ``cluster`` when given."""
        c = (torch.randint(self.clusters, (n,), generator=self.gen) if cluster is None
             else torch.full((n,), cluster))
        x = self.centres[c] + self.spread * torch.randn(n, self.dim, generator=self.gen)
        y = torch.tanh(torch.einsum("nij,nj->ni", self.maps[c], x))
        return x, y


def run(method: str, seed: int, args) -> List[float]:
    """Held-out MSE after every step (index 0: before training)."""
    task = Task(args.dim, args.experts, args.spread, seed)
    held_x, held_y = task.batch(1024)
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.GELU(), nn.Linear(args.hidden, args.dim))
    model = moefy.moefy(dense, args.experts, k=1, normalize=False, expert_noise=0.1)
    if method == "mean":
        init_router(model, [task.batch(64, cluster=i)[0] for i in range(args.experts)], "mean")
    elif method == "kmeans":
        init_router(model, task.batch(64 * args.experts)[0], "kmeans", seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = [task.batch(args.batch) for _ in range(args.steps)]  # same draws for every method of a seed

    def held_out() -> float:
        with torch.no_grad():
            model.eval()
            loss = float((model(held_x) - held_y).square().mean())
            model.train()
        return loss

    losses = [held_out()]
    for x, y in batches:
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(held_out())
    return losses


def steps_to(losses: List[float], threshold: float) -> float:
    return next((float(i) for i, v in enumerate(losses) if v <= threshold), math.inf)


def table(args) -> str:
    rows = ["| method | steps to held-out MSE ≤ %g (median of %d seeds) | final held-out MSE (median) |"
            % (args.threshold, args.seeds), "|---|---|---|"]
    for method in METHODS:
        curves = [run(method, seed, args) for seed in range(args.seeds)]
        steps = statistics.median(steps_to(c, args.threshold) for c in curves)
        final = statistics.median(c[-1] for c in curves)
        rows.append(f"| {method} | {'>%d' % args.steps if math.isinf(steps) else '%g' % steps} | {final:.4f} |")
    return "\n".join(rows)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


def main(argv=None) -> str:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    text = table(parse(argv))
    print(text)
    return text


if __name__ == "__main__":
    main()
