"""Four ways to upcycle the same dense model, trained on the same data with the same budget.

    python examples/upcycling_methods.py          # a few minutes on 2 CPU cores

A small byte-level Llama (transformers, from a config) is first trained dense on the source of some standard-
library modules (offline). Its MLPs are then upcycled four ways, each continued for the same steps on the same
batches with the same schedule and the switch balance loss:

- copies + noise: 8 copies of each MLP, 10 % weight noise, top-2 (moefy's default upcycling);
- drop-upcycling: 8 copies, half of every expert's hidden neurons re-initialised (Nakamura et al., 2025), top-2;
- fine-grained: every MLP cut into 4 slices of a quarter of its neurons, 2 copies of each (8 experts), top-4:
  exact at init, the active FLOPs of one dense MLP;
- informed router: copies + noise, with each router's rows the k-means centroids of its own layer's inputs.

Every method runs with the same few seeds (batches, noise, re-initialisation). It prints a table of medians
(held-out loss right after upcycling, after the budget, steps to reach the dense model's final loss) and draws
the median held-out loss curves into images/upcycling_methods.png; the dense model trained on for the same
steps is the reference line.
"""
from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import transformers  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import moefy  # noqa: E402
from stdlib_text import held_out_loss, stdlib_bytes, windows  # noqa: E402

METHODS = {
    "copies + noise": dict(num_experts=8, k=2, expert_noise=0.1),
    "drop-upcycling": dict(num_experts=8, k=2, drop_fraction=0.5),
    "fine-grained": dict(num_experts=8, k=4, granularity=4),
    "informed router": dict(num_experts=8, k=2, expert_noise=0.1, router_init="kmeans"),
}


def build(args) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=4 * args.dim,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.length, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg)


def train(model, data, args, steps: int, seed: int, held_out, label: str):
    """AdamW with a cosine schedule; the held-out loss at step 0 and every ``args.eval_every`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = [(0, held_out_loss(model, held_out))]
    model.train()
    for step, ids in enumerate(tqdm(windows(data, steps, args.batch, args.length, seed), total=steps, desc=label,
                                    leave=False), start=1):
        loss = model(ids, labels=ids).loss + moefy.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == steps:
            curve.append((step, held_out_loss(model, held_out)))
    return curve


def median_curve(curves):
    """[(step, median loss over the runs)] of runs evaluated at the same steps."""
    return [(points[0][0], float(torch.tensor([l for _, l in points]).median())) for points in zip(*curves)]


def steps_to(curve, threshold: float):
    return next((s for s, l in curve if l <= threshold), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="runs of every method (medians in the table)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "images")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    data = stdlib_bytes()
    split = int(0.95 * len(data))
    train_data, test_data = data[:split], data[split:]
    held_out = list(windows(test_data, 8, 32, args.length, seed=1))
    dense = build(args)
    train(dense, train_data, args, args.dense_steps, seed=args.seed, held_out=held_out, label="dense pretraining")
    kmeans_data = list(windows(train_data, 4, 32, args.length, seed=2))

    runs = {name: [] for name in ["dense, trained on", *METHODS]}  # name -> one curve per seed
    for seed in range(args.seed + 1, args.seed + 1 + args.seeds):
        runs["dense, trained on"].append(train(copy.deepcopy(dense), train_data, args, args.steps, seed=seed,
                                               held_out=held_out, label=f"dense, seed {seed}"))
        for name, options in METHODS.items():
            options = dict(options)
            if options.get("router_init"):
                options["router_data"] = [ids[:, :-1] for ids in kmeans_data]
            torch.manual_seed(seed)  # the same noise / re-initialisation draws for every method
            model = moefy.moefy(copy.deepcopy(dense), target="mlp", aux_criterion={"switch": 0.01}, **options)
            runs[name].append(train(model, train_data, args, args.steps, seed=seed, held_out=held_out,
                                    label=f"{name}, seed {seed}"))
    curves = {name: median_curve(c) for name, c in runs.items()}

    start, threshold = curves["dense, trained on"][0][1], curves["dense, trained on"][-1][1]
    print(f"dense model after {args.dense_steps} steps: held-out loss {start:.4f}; each method then trains "
          f"{args.steps} more steps on the same batches; medians over {args.seeds} seeds (batches, noise, "
          f"re-initialisation), held-out loss over {len(held_out)} batches\n")
    print(f"| method | experts, active | held-out loss after upcycling | after {args.steps} steps (min–max) | "
          f"steps to the dense model's final loss ({threshold:.4f}) |")
    print("| --- | --- | --- | --- | --- |")
    for name, curve in curves.items():
        o = METHODS.get(name, {})
        active = f"{o['num_experts']}, top-{o['k']}" if o else "dense"
        finals = [c[-1][1] for c in runs[name]]
        reached = steps_to(curve, threshold)
        print(f"| {name} | {active} | {curve[0][1]:.4f} | {curve[-1][1]:.4f} ({min(finals):.4f}–{max(finals):.4f}) | "
              f"{reached if reached is not None else f'> {args.steps}'} |")

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(*zip(*curve), label=name, lw=2 if name.startswith("dense") else 1.5,
                ls="--" if name.startswith("dense") else "-", color="black" if name.startswith("dense") else None)
    ax.set(xlabel="training steps after upcycling", ylabel="held-out loss (nats per byte)",
           title=f"Upcycling a {args.layers}-layer byte-level Llama four ways (median of {args.seeds} seeds)")
    ax.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "upcycling_methods.png"
    fig.savefig(path, dpi=args.dpi)
    print(f"\nwrote {path}")
    return curves


if __name__ == "__main__":
    main()
