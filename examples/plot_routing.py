"""See the routing: train a tiny patch mixture on sklearn's digits, then draw every moefy picture.

    python examples/plot_routing.py [--epochs 6] [--out images]

The model (patches → linear → [CLS] + tokens → MoE → attention → MoE with a hole → CLS → classes) has no
position embedding, so it runs on any patch grid: after training on 64x64 digits it routes the 16x16
patches of a photo (Grace Hopper, bundled with matplotlib, cropped to 576x448). Writes into ``--out``:
patch_routing_layer1.png / _layer3.png (the photo), digit_routing.png, expert_load.png,
total_expert_load.png, load_heatmap.png, training_log.jsonl and dashboard/ (what ``moefy plot`` draws).
"""
import argparse
import logging
from pathlib import Path

import matplotlib.cbook as cbook
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

from moefy.block import MoEBlock, aux_loss
from moefy.observe.cli import plot_log
from moefy.observe.log import TrainingLogWriter
from moefy.observe.recorder import RoutingRecorder
from moefy.viz import image_through_experts, plot_experts_load, plot_load_heatmap, plot_total_load


class MLPMixture(MoEBlock):
    def __init__(self, dim: int, hidden: int, num_experts: int, **routing):
        experts = [nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(num_experts)]
        super().__init__(experts=experts, input_dim=dim, **routing)

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


class TinyPatchMoE(nn.Module):
    """x (B, 1, H, W), H and W multiples of ``patch`` → logits (B, classes). One CLS token, no positions."""

    def __init__(self, patch: int = 16, dim: int = 64, classes: int = 10):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.moe1 = MLPMixture(dim, 2 * dim, 4, k=1, aux_criterion="switch", layer_id=1)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.moe2 = MLPMixture(dim, 2 * dim, 3, k=1, hole=True, aux_criterion="switch", layer_id=3)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch, p2=self.patch))
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        t = t + self.moe1(self.norm1(t))
        h = self.norm2(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.moe2(t)
        return self.head(t[:, 0])


def digits(scale: int):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("images"))
    parser.add_argument("--dpi", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    x, y = digits(scale=args.patch // 2)                  # 8x8 digits → a 4x4 grid of patches
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]
    model = TinyPatchMoE(patch=args.patch)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.jsonl"

    with TrainingLogWriter(log_path) as writer, RoutingRecorder(model, num_classes=10) as rec:
        for epoch in tqdm(range(1, args.epochs + 1), desc="epochs"):
            model.train()
            rec.reset()
            rec.enabled = True
            order = train[torch.randperm(len(train))]
            total, correct = 0.0, 0
            for i in range(0, len(order), args.batch):
                idx = order[i:i + args.batch]
                rec.labels = y[idx]
                out = model(x[idx])
                loss = F.cross_entropy(out, y[idx])
                optim.zero_grad()
                (loss + 0.01 * aux_loss(model)).backward()
                optim.step()
                total += loss.item() * len(idx)
                correct += int((out.argmax(1) == y[idx]).sum())
            rec.enabled = False
            model.eval()
            with torch.no_grad():
                out = model(x[test])
            metrics = {"loss": total / len(train), "accuracy": correct / len(train),
                       "test_loss": F.cross_entropy(out, y[test]).item(),
                       "test_accuracy": (out.argmax(1) == y[test]).float().mean().item()}
            writer.write(epoch, rec, metrics)
            tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

        # load over the test set, per token position (position 0 is the CLS token)
        rec.reset()
        rec.enabled, rec.labels = True, y[test]
        with torch.no_grad():
            model(x[test])
        rec.enabled = False

    def save(fig, name: str) -> None:
        fig.savefig(args.out / name, dpi=args.dpi)
        logging.info("wrote %s", args.out / name)

    photo = plt.imread(cbook.get_sample_data("grace_hopper.jpg"))[12:588, 32:480]   # 576x448: 36x28 patches
    to_gray = lambda rgb: rgb.mean(dim=1, keepdim=True)                              # the model reads gray
    for fig, block in zip(image_through_experts(photo, model, args.patch, preprocess=to_gray),
                          (model.moe1, model.moe2)):
        save(fig, f"patch_routing_layer{block.layer_id}.png")
    digit = x[test[0]]
    for fig, block in zip(image_through_experts(digit, model, args.patch), (model.moe1, model.moe2)):
        if block is model.moe2:
            save(fig, "digit_routing.png")
    save(plot_experts_load(model.moe1, rec.stats["moe1"].position_load), "expert_load.png")
    save(plot_total_load(model.moe2, rec.stats["moe2"].load), "total_expert_load.png")
    save(plot_load_heatmap(rec), "load_heatmap.png")
    for path in plot_log(str(log_path), str(args.out / "dashboard"), dpi=args.dpi):
        logging.info("wrote %s", path)


if __name__ == "__main__":
    main()
