"""moefy's main demo: a tiny ViT whose MLPs are moefied (token choice, k=1, one hole expert), trained on real images.

    python examples/vit_demo.py [--epochs 3] [--train-size 20000] [--images images] [--out runs/vit_demo]

Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist), the
IDX / CIFAR-10 files in --data-dir, else scikit-learn's 8x8 digits; nothing is downloaded. Every block's
MLP becomes a mixture of its copies (moefy.convert.moefy) with a hole column: a patch routed to the hole
skips that MLP (its residual passes through). After training it writes to --images: the expert load per
patch position over the test set, the layer × expert load heatmap, which patches of a few test images and of
matplotlib's grace_hopper.jpg went to which expert, and the training-log dashboard; the JSON-lines log
goes to --out. Prints the test accuracy and where the pictures are.
"""
import argparse
import logging
import time
from pathlib import Path

import matplotlib.image as mpimg
import torch
import torch.nn.functional as F
from einops import rearrange
from matplotlib import cbook
from torch import nn
from tqdm import tqdm

from moefy.block import aux_loss, moe_blocks
from moefy.convert import moefy
from moefy.data import load_images
from moefy.observe.log import TrainingLogWriter, read_log
from moefy.observe.recorder import RoutingRecorder
from moefy.viz import image_through_experts, plot_dashboard, plot_experts_load, plot_load_heatmap


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; x (B, N, D)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, learned position embeddings, ``depth`` blocks, mean pooling (no CLS token).

    Takes (B, C, H, W) images of any size that is a multiple of ``patch``: the position embeddings of the
    training grid are interpolated to other grids (for routing pictures of bigger photos).
    """

    def __init__(self, image_shape, classes: int, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 hidden: int = 128):
        super().__init__()
        channels, height, width = image_shape
        self.patch, self.grid = patch, (height // patch, width // patch)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, dim, *self.grid) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        pos = self.pos if t.shape[2:] == self.pos.shape[2:] else \
            F.interpolate(self.pos, size=t.shape[2:], mode="bicubic", align_corners=False)
        t = rearrange(t + pos, "b d h w -> b (h w) d")  # row-major patches, as moefy.viz expects
        return self.head(self.norm(self.blocks(t)).mean(dim=1))


def photo(height: int) -> torch.Tensor:
    """matplotlib's grace_hopper.jpg (600×512 RGB), resized to ``height`` rows: (3, height, W) in [0, 1]."""
    image = mpimg.imread(cbook.get_sample_data("grace_hopper.jpg"))
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)[None]
    width = round(height * x.shape[3] / x.shape[2])
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recorder: RoutingRecorder, batch: int = 500):
    model.eval()
    recorder.reset()
    correct = 0
    for i in range(0, len(y), batch):
        recorder.labels = y[i:i + batch]  # per-image labels, spread over its patches: class × expert affinity
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return correct / len(y)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="IDX or CIFAR-10 directory (default: Fashion-MNIST)")
    parser.add_argument("--images", default="images", help="where the pictures go")
    parser.add_argument("--out", default="runs/vit_demo", help="where the training log goes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=20000, help="random training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patch", type=int, default=None, help="patch size (default: 4, or 2 for 8x8 images)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="weight of the switch balance loss")
    parser.add_argument("--photo-height", type=int, default=96, help="grace_hopper.jpg is resized to this")
    parser.add_argument("--show", type=int, default=2, help="test images to draw the patch routing of")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    images, out = Path(args.images), Path(args.out)
    images.mkdir(parents=True, exist_ok=True)

    data = load_images(args.data_dir).subset(args.train_size or None, args.test_size, seed=args.seed)
    print(f"data: {data.name}: {len(data.train_y)} train / {len(data.test_y)} test images {data.image_shape}")
    patch = args.patch or (4 if min(data.image_shape[1:]) >= 16 else 2)
    model = TinyViT(data.image_shape, data.num_classes, patch=patch, dim=args.dim, depth=args.depth,
                    heads=4, hidden=2 * args.dim)
    # every block's MLP → a mixture of 4 copies of it + a hole; k=1; a little noise breaks the copies' symmetry
    moefy(model, num_experts=args.num_experts, k=1, target="blocks.*.mlp", hole=True,
          aux_criterion={"switch": args.aux_coef}, expert_noise=0.1)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {patch}x{patch} patches, "
          f"{len(moe_blocks(model))} moefied MLPs:\n  " + "\n  ".join(b.moe_name for b in moe_blocks(model)))
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * -(-len(data.train_y) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    recorder = RoutingRecorder(model, num_classes=data.num_classes)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    with TrainingLogWriter(out / "train_log.jsonl") as log, recorder:
        for epoch in range(1, args.epochs + 1):
            model.train()
            recorder.enabled = False
            order = torch.randperm(len(data.train_y), generator=gen)
            total, seen = 0.0, 0
            bar = tqdm(range(0, len(order), args.batch), desc=f"epoch {epoch}/{args.epochs}", leave=False)
            for i in bar:
                idx = order[i:i + args.batch]
                loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                optim.zero_grad()
                (loss + aux_loss(model)).backward()
                optim.step()
                sched.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                bar.set_postfix(loss=f"{total / seen:.3f}")
            recorder.enabled = True
            acc = evaluate(model, data.test_x, data.test_y, recorder)
            entry = log.write(epoch, recorder, {"train_loss": total / seen, "test_accuracy": acc})
            print(f"epoch {epoch}: train loss {total / seen:.4f}, test accuracy {100 * acc:.2f} %, "
                  f"routing accuracy {entry['routing_acc']}, hole share {entry['utilization'][-1]:.3f}")
    print(f"trained in {time.time() - start:.0f} s")

    written = []

    def save(fig, name):
        fig.savefig(images / name, dpi=110)
        written.append(images / name)

    for name, block in recorder.blocks.items():  # load per patch position over the whole test set
        save(plot_experts_load(block, recorder.stats[name].position_load), f"vit_expert_load_layer{block.layer_id}.png")
    save(plot_load_heatmap(recorder), "vit_load_heatmap.png")
    for j in range(min(args.show, len(data.test_y))):
        for block, fig in zip(moe_blocks(model), image_through_experts(data.test_x[j], model, patch)):
            save(fig, f"vit_patch_routing_test{j}_layer{block.layer_id}.png")
    hopper = photo(args.photo_height // patch * patch)
    hopper = hopper[:, :, : hopper.shape[2] // patch * patch]
    gray = (lambda x: x.mean(dim=1, keepdim=True)) if data.image_shape[0] == 1 else None
    for block, fig in zip(moe_blocks(model), image_through_experts(hopper, model, patch, preprocess=gray)):
        save(fig, f"vit_patch_routing_grace_hopper_layer{block.layer_id}.png")
    save(plot_dashboard(read_log(out / "train_log.jsonl")), "vit_dashboard.png")

    print(f"test accuracy: {100 * acc:.2f} % on {len(data.test_y)} {data.name} test images")
    print(f"training log: {out / 'train_log.jsonl'}")
    print("pictures:\n  " + "\n  ".join(str(p) for p in written))
    return {"accuracy": acc, "pictures": [str(p) for p in written], "log": str(out / "train_log.jsonl")}


if __name__ == "__main__":
    main()
