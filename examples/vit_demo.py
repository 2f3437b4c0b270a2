"""moefy's main demo: a tiny ViT whose MLPs are moefied (token choice, k=1, one hole expert), trained on real
images, next to the same ViT with dense MLPs of the same active FLOPs trained the same way.

    python examples/vit_demo.py [--data-dir DIR] [--epochs N] [--train-size N] [--images images]

Data: the IDX / CIFAR-10 files in --data-dir, else Fashion-MNIST from /usr/share/datasets/fashion-mnist
(Debian's dataset-fashion-mnist; `make demo` installs it where it can), else scikit-learn's bundled 8x8 digits;
nothing is downloaded. Each data set has its own defaults (epochs, patch size, ...: PRESETS), the ones the
README's numbers come from. Every block's MLP becomes a mixture of 4 copies of it (moefy.convert.moefy) with
a hole column: a patch routed to the hole skips that MLP (its residual passes through); the switch balance
loss keeps every expert in use. After training it writes to --images, with the data set in every file name
(vit_<data>_*.png): the expert load per patch position over the test set, the layer x expert load heatmap,
which patches of a few test images and of matplotlib's grace_hopper.jpg went to which expert, and the
training-log dashboard; the JSON-lines log goes to --out/<data>. Prints both models' test accuracy.
"""
import argparse
import logging
import time
from pathlib import Path
from typing import Optional, Tuple

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
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recorder: Optional[RoutingRecorder] = None,
             batch: int = 500) -> float:
    """Test accuracy; with a recorder, the routing statistics of the test set (labels: one per image)."""
    model.eval()
    if recorder is not None:
        recorder.reset()
    correct = 0
    for i in range(0, len(y), batch):
        if recorder is not None:
            recorder.labels = y[i:i + batch]  # per-image labels, spread over its patches: class x expert affinity
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return correct / len(y)


def train(model: nn.Module, data, args, label: str, recorder: Optional[RoutingRecorder] = None,
          log: Optional[TrainingLogWriter] = None) -> Tuple[float, float]:
    """AdamW + one-cycle schedule on ``data``'s training split, the batches drawn with ``args.seed``: the
    same for every model. Returns (test accuracy, seconds of training)."""
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    batches = -(-len(data.train_y) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=args.lr, total_steps=args.epochs * batches,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    seconds, acc = 0.0, 0.0
    bar = tqdm(total=args.epochs * batches, desc=label, leave=False)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        if recorder is not None:
            recorder.enabled = False
        order = torch.randperm(len(data.train_y), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            optim.zero_grad()
            (loss + aux_loss(model)).backward()
            optim.step()
            sched.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{total / seen:.3f}")
        seconds += time.perf_counter() - start
        last = epoch == args.epochs
        if recorder is not None:
            recorder.enabled = True
        if last or log is not None:  # the MoE run logs every epoch; the dense one is only tested at the end
            acc = evaluate(model, data.test_x, data.test_y, recorder)
        if log is not None:
            entry = log.write(epoch, recorder, {"train_loss": total / seen, "test_accuracy": acc})
            if last or epoch % max(1, args.epochs // 5) == 0:
                bar.write(f"{label} epoch {epoch}: train loss {total / seen:.4f}, test accuracy {100 * acc:.2f} %, "
                          f"hole share {entry['utilization'][-1]:.3f}")
    bar.close()
    return acc, seconds


def mlp_flops_per_token(model: nn.Module) -> int:
    """Multiply-adds per token of one MLP (its two Linears), the FLOPs a token's routed expert costs."""
    mlp = model.blocks[0].mlp
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    if hasattr(mlp, "experts"):
        linears = [m for m in mlp.experts[0].modules() if isinstance(m, nn.Linear)]
    return sum(l.in_features * l.out_features for l in linears)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="IDX or CIFAR-10 directory (default: Fashion-MNIST)")
    parser.add_argument("--images", default="images", help="where the pictures go")
    parser.add_argument("--out", default="runs/vit_demo", help="where the training log goes (a folder per data set)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the data set's preset")
    parser.add_argument("--train-size", type=int, default=None, help="random training subset (0: all)")
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--patch", type=int, default=None, help="patch size")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="weight of the switch balance loss")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--photo-height", type=int, default=96, help="grace_hopper.jpg is resized to this")
    parser.add_argument("--show", type=int, default=2, help="test images to draw the patch routing of")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    begin = time.perf_counter()
    data = load_images(args.data_dir)
    key = data_key(data)
    for name, value in PRESETS.get(key, PRESETS["default"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    data = data.subset(args.train_size or None, args.test_size, seed=args.seed)
    images, out = Path(args.images), Path(args.out) / key
    images.mkdir(parents=True, exist_ok=True)

    def build() -> TinyViT:
        torch.manual_seed(args.seed)  # the MoE's experts start as copies of the dense model's MLPs
        return TinyViT(data.image_shape, data.num_classes, patch=args.patch, dim=args.dim, depth=args.depth,
                       heads=4, hidden=2 * args.dim)

    model = build()
    # every block's MLP -> a mixture of 4 copies of it + a hole; k=1; a little noise breaks the copies' symmetry
    moefy(model, num_experts=args.num_experts, k=1, target="blocks.*.mlp", hole=True,
          aux_criterion={"switch": args.aux_coef}, expert_noise=0.1)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {args.patch}x{args.patch} patches, "
          f"{len(moe_blocks(model))} moefied MLPs:\n  " + "\n  ".join(b.moe_name for b in moe_blocks(model)))
    recorder = RoutingRecorder(model, num_classes=data.num_classes)
    with TrainingLogWriter(out / "train_log.jsonl") as log, recorder:
        acc, seconds = train(model, data, args, "MoE", recorder, log)
    utilization = {name: s.utilization for name, s in recorder.stats.items()}
    results = {"moe": {"accuracy": acc, "seconds": seconds, "params": _params(model)}}
    if not args.no_dense:
        dense = build()
        dense_acc, dense_seconds = train(dense, data, args, "dense")
        results["dense"] = {"accuracy": dense_acc, "seconds": dense_seconds, "params": _params(dense)}

    written = []

    def save(fig, name):
        path = images / f"vit_{key}_{name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)

    for name, block in recorder.blocks.items():  # load per patch position over the whole test set
        save(plot_experts_load(block, recorder.stats[name].position_load), f"expert_load_layer{block.layer_id}")
    save(plot_load_heatmap(recorder), "load_heatmap")
    for j in range(min(args.show, len(data.test_y))):
        for block, fig in zip(moe_blocks(model), image_through_experts(data.test_x[j], model, args.patch)):
            save(fig, f"patch_routing_test{j}_layer{block.layer_id}")
    hopper = photo(args.photo_height // args.patch * args.patch)
    hopper = hopper[:, :, : hopper.shape[2] // args.patch * args.patch]
    gray = (lambda x: x.mean(dim=1, keepdim=True)) if data.image_shape[0] == 1 else None
    for block, fig in zip(moe_blocks(model), image_through_experts(hopper, model, args.patch, preprocess=gray)):
        save(fig, f"patch_routing_grace_hopper_layer{block.layer_id}")
    save(plot_dashboard(read_log(out / "train_log.jsonl")), "dashboard")

    flops = mlp_flops_per_token(model)
    print(f"\n{len(data.test_y)} {data.name} test images, {args.epochs} epochs of {len(data.train_y)}:")
    print(f"  {'model':<42} {'parameters':>10} {'MLP MACs/token':>14} {'test acc':>9} {'train time':>10}")
    rows = [("moe", f"ViT, MoE MLPs ({args.num_experts} experts + hole, k=1)")]
    rows += [("dense", "ViT, dense MLPs (same active FLOPs)")] if "dense" in results else []
    for key_, label in rows:
        r = results[key_]
        print(f"  {label:<42} {r['params']:>10,} {flops:>14,} {100 * r['accuracy']:>8.2f}% {r['seconds']:>9.0f}s")
    for name, u in utilization.items():
        print(f"  final routing of {name}: " + ", ".join(f"{100 * v:.1f}%" for v in u[:-1]) +
              f" of patches to the experts, {100 * u[-1]:.1f}% to the hole")
    print(f"training log: {out / 'train_log.jsonl'}; whole run {time.perf_counter() - begin:.0f} s")
    print("pictures:\n  " + "\n  ".join(str(p) for p in written))
    return {"accuracy": acc, "data": key, "results": results, "utilization": utilization,
            "pictures": [str(p) for p in written], "log": str(out / "train_log.jsonl")}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def data_key(data) -> str:
    """A short name for the data set, used in file names: ``fashion-mnist``, ``mnist``, ``cifar-10``, ``digits``."""
    return "digits" if data.name.startswith("sklearn") else data.name.split()[0]


# Per data set: settings that reach a result worth showing in a few minutes on 2 CPU cores (README table).
PRESETS = {
    "digits": dict(epochs=40, train_size=0, batch=32, lr=3e-3, patch=2, dim=64),
    "default": dict(epochs=6, train_size=0, batch=128, lr=3e-3, patch=7, dim=96),
}


if __name__ == "__main__":
    main()
