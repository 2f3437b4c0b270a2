"""Seed 001: a small CNN with an MoE classification head against the same CNN with a dense head.

    python examples/calibrated_classifier.py [--epochs 4] [--train-size 30000] [--out runs/calibrated_classifier]

The MoE head routes each image's feature vector to k of E MLP experts (top-k gate with a temperature,
combine weights renormalised over the k, seed 001's balance regulariser). Both models see the same batches.
After every epoch both are evaluated on the test set: accuracy, NLL, ECE (15 equal-width bins). Writes to
--out: train_log.jsonl (one JSON line per epoch: the MoE head's routing and both models' metrics),
results.csv, reliability.png (both models' reliability diagrams) and checkpoint.pt.
"""
import argparse
import csv
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moefy.block import MoEBlock
from moefy.data import load_images
from moefy.observe.log import TrainingLogWriter
from moefy.recipes.metrics import classification_report, reliability_bins
from moefy.recipes.reliability import plot_reliability
from moefy.observe.recorder import RoutingRecorder


class Backbone(nn.Module):
    """Three 3×3 conv blocks and global average pooling: (B, C_in, H, W) → (B, width)."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(in_channels, width // 4), nn.MaxPool2d(2),
                                      block(width // 4, width // 2), nn.MaxPool2d(2, ceil_mode=True),
                                      block(width // 2, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def mlp(dim: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class MoEHead(MoEBlock):
    """Seed 001's head: E MLP experts D → C logits; the block does the top-k gate and the weighted sum."""

    def __init__(self, dim: int, hidden: int, classes: int, num_experts: int, **routing):
        super().__init__(experts=[mlp(dim, hidden, classes) for _ in range(num_experts)], input_dim=dim,
                         **routing)

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build(kind: str, in_channels: int, classes: int, args) -> Classifier:
    backbone = Backbone(in_channels, args.width)
    if kind == "dense":
        return Classifier(backbone, mlp(args.width, args.hidden, classes))
    head = MoEHead(args.width, args.hidden, classes, args.num_experts, k=args.k, temperature=args.temperature,
                   aux_criterion={"balance": args.lb_coef}, layer_id=0)
    return Classifier(backbone, head)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recorder=None, batch: int = 1000) -> torch.Tensor:
    """Test-set probabilities (N, C); with a recorder, its labels follow the batches (for the affinity)."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        if recorder is not None:
            recorder.labels = y[i:i + batch]
        outs.append(model(x[i:i + batch]))
    return torch.cat(outs).softmax(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="IDX or CIFAR-10 directory (default: Fashion-MNIST)")
    parser.add_argument("--out", default="runs/calibrated_classifier")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=30000, help="random training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=64, help="backbone feature size D")
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the head / each expert")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0, help="gate temperature")
    parser.add_argument("--lb-coef", type=float, default=0.01, help="balance regulariser coefficient")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_images(args.data_dir).subset(args.train_size or None, args.test_size, seed=args.seed)
    print(f"data: {data.name}: {len(data.train_y)} train / {len(data.test_y)} test images {data.image_shape}")
    models = {}
    for kind in ("dense", "moe"):
        torch.manual_seed(args.seed)  # the same backbone initialisation for both
        models[kind] = build(kind, data.image_shape[0], data.num_classes, args)
    optims = {k: torch.optim.Adam(m.parameters(), lr=args.lr) for k, m in models.items()}
    steps = args.epochs * -(-len(data.train_y) // args.batch)
    scheds = {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for k, o in optims.items()}
    recorder = RoutingRecorder(models["moe"], num_classes=data.num_classes)
    gen = torch.Generator().manual_seed(args.seed)
    rows, start = [], time.time()
    with TrainingLogWriter(out / "train_log.jsonl") as log, recorder:
        for epoch in range(1, args.epochs + 1):
            for m in models.values():
                m.train()
            recorder.enabled = False
            order = torch.randperm(len(data.train_y), generator=gen)
            sums = {k: 0.0 for k in models}
            bar = tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch}/{args.epochs}", leave=False)
            for i in bar:
                idx = order[i:i + args.batch]
                x, y = data.train_x[idx], data.train_y[idx]
                for kind, model in models.items():
                    loss = F.cross_entropy(model(x), y)
                    total = loss + model.head.aux_loss if kind == "moe" else loss
                    optims[kind].zero_grad()
                    total.backward()
                    optims[kind].step()
                    scheds[kind].step()
                    sums[kind] += loss.item() * len(idx)
                    bar.set_postfix_str(f"{kind} loss {loss.item():.3f}")
            recorder.reset()  # the log holds the MoE head's routing of the test set, with labels
            recorder.enabled = True
            metrics, probs = {}, {}
            for kind, model in models.items():
                probs[kind] = predict(model, data.test_x, data.test_y, recorder if kind == "moe" else None)
                report = classification_report(probs[kind], data.test_y)
                report["train_loss"] = sums[kind] / len(order)
                metrics.update({f"{kind}_{name}": value for name, value in report.items()})
                rows.append({"epoch": epoch, "model": kind, **{n: round(v, 6) for n, v in report.items()}})
                print(f"epoch {epoch} {kind:5s}  train loss {report['train_loss']:.4f}  test accuracy "
                      f"{100 * report['accuracy']:.2f} %  NLL {report['nll']:.4f}  ECE {100 * report['ece']:.2f} %")
            log.write(epoch, recorder, metrics)
            print(f"epoch {epoch} moe head: utilization {[round(u, 3) for u in recorder.summary()[0]['utilization']]}")
    print(f"trained both models in {time.time() - start:.0f} s")

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = plot_reliability({kind: reliability_bins(p, data.test_y) for kind, p in probs.items()})
    fig.savefig(out / "reliability.png", dpi=120)
    torch.save({"args": vars(args), "epoch": args.epochs, "classes": data.classes,
                **{kind: m.state_dict() for kind, m in models.items()}}, out / "checkpoint.pt")
    print(f"wrote {out / 'train_log.jsonl'}, {out / 'results.csv'}, {out / 'reliability.png'}, "
          f"{out / 'checkpoint.pt'}")
    return {"final": {r["model"]: r for r in rows[-2:]}, "out": str(out)}


if __name__ == "__main__":
    main()
