"""Prune and merge the experts of a small trained MoE, and see what each way of choosing costs.

    python examples/compress_experts.py           # 2-3 minutes on 2 CPU cores
    python examples/compress_experts.py --quick   # seconds: tiny sizes, a smoke run

1. build a byte-level Qwen3-MoE from a config (8 experts, top-2, random weights; vocab 256, no tokenizer file),
   import it with ``moefy.hf.from_hf`` (switch balance loss) and train it on the source of some standard-library
   modules (offline); the last 5 % of the bytes are held out;
2. score its experts on a few training windows (``moefy.compress.expert_scores``: frequency, soft, REAP, EAN; and
   random scores), prune every layer to 6 and to 4 experts (75 %, 50 %) with each, and merge every layer to 4
   (HC-SMoE: ``merge_experts``, frequency-weighted and plain averages, REAP picking each group's router row);
3. each compressed copy: held-out loss right after compression, then after a few recovery steps (the same batches
   and schedule for every method), then ``moefy.hf.export`` and transformers' ``from_pretrained`` of the folder,
   whose logits must equal the compressed model's; the uncompressed model trained on for the same steps is the
   reference.

Every seed trains its own model (initialisation, batches) and draws its own calibration windows, random scores
and recovery batches, the same for every method; the table holds medians (min–max) over the seeds. It is printed,
written to images/compress_experts.md, and drawn in images/compress_experts.png.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import transformers  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import moefy  # noqa: E402
import moefy.hf  # noqa: E402
from moefy.compress import expert_scores, merge_experts, prune_experts  # noqa: E402
from moefy.compress.calibrate import named_blocks  # noqa: E402
from stdlib_text import held_out_loss, stdlib_bytes, windows  # noqa: E402

logger = logging.getLogger("compress_experts")

SCORES = ("frequency", "soft", "reap", "ean", "random")
MERGES = ("frequency_weighted", "average")
EXPORT_TOLERANCE = 1e-4


def build(args, seed: int) -> transformers.Qwen3MoeForCausalLM:
    """A byte-level Qwen3-MoE (random weights) imported by moefy, with the switch balance loss."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=args.dim, intermediate_size=2 * args.dim, moe_intermediate_size=args.expert_dim,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.dim // 4,
        num_experts=args.experts, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=args.length,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return moefy.hf.from_hf(transformers.Qwen3MoeForCausalLM(cfg), aux_criterion={"switch": 0.01})


def train(model, data, args, steps: int, lr: float, seed: int, label: str) -> None:
    """AdamW, cosine schedule, language-model loss plus the blocks' balance loss, on seeded windows of ``data``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for ids in tqdm(windows(data, steps, args.batch, args.length, seed), total=steps, desc=label, leave=False):
        loss = model(ids, labels=ids).loss + moefy.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def compress(model, method: str, keep: int, calibration, seed: int) -> None:
    """Prune (``prune <score>``) or merge (``merge <average>``) every block of ``model`` to ``keep`` experts."""
    kind, how = method.split(" ", 1)
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        scores = {name: torch.rand(block.num_experts, generator=g, dtype=torch.float64)
                  for name, block in named_blocks(model).items()}
    else:
        scores = expert_scores(model, calibration, "reap" if kind == "merge" else how)
    if kind == "merge":
        merge_experts(model, keep, scores, calibration, method=how)
    else:
        kept = prune_experts(model, keep, scores)
        logger.debug("%s to %d: kept %s", method, keep, kept)


def export_and_check(model, probe: torch.Tensor) -> tuple:
    """Export ``model`` with moefy.hf.export, load it with transformers; (safetensors MB, max |logit diff|)."""
    with tempfile.TemporaryDirectory(prefix="compressed-") as folder:
        moefy.hf.export(model, folder)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        experts = loaded.config.num_experts
        model.eval()
        with torch.no_grad():
            error = (loaded(probe).logits - model(probe).logits).abs().max().item()
    if {experts} != {block.num_experts for block in named_blocks(model).values()}:
        raise AssertionError(f"the exported config has {experts} experts")
    return size / 1e6, error


def median(values) -> float:
    return float(torch.tensor(values).median())


def cell(values) -> str:
    """The median of the seeds' values, with their range when there is more than one."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{median(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def table(rows, args) -> str:
    lines = [f"| method | experts kept | held-out loss after compression | after {args.recovery_steps} recovery "
             f"steps | exported MB |", "| --- | --- | --- | --- | --- |"]
    for (method, keep), r in rows.items():
        lines.append(f"| {method} | {keep} of {args.experts} | {cell(r['compressed'])} | {cell(r['recovered'])} | "
                     f"{r['mb']:.3f} |")
    return "\n".join(lines)


def picture(rows, args, base_loss: float, path: Path) -> None:
    """Held-out loss after compression (light) and after recovery (dark) per method, one panel per budget."""
    keeps = sorted({keep for _, keep in rows if keep < args.experts}, reverse=True)
    widths = [sum(k == keep for _, k in rows) for keep in keeps]
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, len(keeps), sharey=True, squeeze=False, width_ratios=widths)[0]
    reference = rows[("none (trained on)", args.experts)]
    top = max(max(r["compressed"]) for r in rows.values())
    for ax, keep in zip(axes, keeps):
        methods = [m for m, k in rows if k == keep]
        x = torch.arange(len(methods)).float()
        for shift, stage, style in ((-0.2, "compressed", dict(color="tab:orange", alpha=0.5,
                                                                label="right after compression")),
                                    (0.2, "recovered", dict(color="tab:blue",
                                                            label=f"after {args.recovery_steps} recovery steps"))):
            values = [rows[(m, keep)][stage] for m in methods]
            mid = torch.tensor([median(v) for v in values])
            spread = torch.tensor([[median(v) - min(v) for v in values], [max(v) - median(v) for v in values]])
            ax.bar(x + shift, mid, 0.4, yerr=spread if args.seeds > 1 else None, capsize=2, **style)
        ax.axhline(base_loss, color="black", ls="--", lw=1.2, label=f"uncompressed ({args.experts} experts)")
        ax.axhline(median(reference["recovered"]), color="black", ls=":", lw=1.2,
                   label=f"uncompressed, trained {args.recovery_steps} steps more")
        ax.set_xticks(x.tolist(), [m.replace(" ", "\n", 1).replace("_", "-\n") for m in methods], fontsize=8)
        ax.set_title(f"keep {keep} of {args.experts} experts per layer ({keep / args.experts:.0%})", fontsize=10)
    low = min(base_loss, median(reference["recovered"]))
    axes[0].set_ylim(low - 0.1 * (top - low) - 0.02, top + 0.05 * (top - low) + 0.02)
    axes[0].set_ylabel("held-out loss (nats per byte)")
    axes[0].legend(fontsize=8, loc="upper left")
    seeds = f"median (min–max) of {args.seeds} seeds" if args.seeds > 1 else "one seed"
    fig.suptitle(f"Compressing a {args.layers}-layer byte-level Qwen3-MoE (top-2 of {args.experts}); {seeds}; the y "
                 f"axis does not start at 0", fontsize=10)
    fig.savefig(path, dpi=args.dpi)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps of the model to compress")
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--calibration", type=int, default=4, help="calibration batches (of --batch windows)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--expert-dim", type=int, default=64, help="moe_intermediate_size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--recovery-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="runs of every method (medians in the table)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a model this small gains little "
                        "from more, and a busy machine makes them wait on each other)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "images")
    parser.add_argument("--dpi", type=int, default=110)
    if parser.parse_args(argv).quick:  # tiny defaults; options given still win
        parser.set_defaults(steps=20, recovery_steps=3, calibration=2, seeds=1, batch=8, length=32, dim=32,
                            expert_dim=16, layers=2, dpi=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = stdlib_bytes()
    split = int(0.95 * len(data))
    train_data, test_data = data[:split], data[split:]
    held_out = list(windows(test_data, 8, 32, args.length, seed=1))
    probe = held_out[0][:4]
    budgets = [(f"prune {s}", keep) for keep in (args.experts * 3 // 4, args.experts // 2) for s in SCORES]
    budgets += [(f"merge {m}", args.experts // 2) for m in MERGES]
    budgets = [("none (trained on)", args.experts)] + budgets
    rows = {b: {"compressed": [], "recovered": []} for b in budgets}
    errors = []
    for seed in range(args.seed, args.seed + args.seeds):
        model = build(args, seed)
        train(model, train_data, args, args.steps, args.lr, seed=seed, label=f"seed {seed}: training")
        logger.info("seed %d: trained %d steps, held-out loss %.4f nats per byte", seed, args.steps,
                    held_out_loss(model, held_out))
        calibration = [ids[:, :-1] for ids in windows(train_data, args.calibration, args.batch, args.length,
                                                      seed=1000 + seed)]
        for method, keep in tqdm(budgets, desc=f"seed {seed}", leave=False):
            small = copy.deepcopy(model)
            if keep < args.experts:
                compress(small, method, keep, calibration, seed)
            row = rows[(method, keep)]
            row["compressed"].append(held_out_loss(small, held_out))
            train(small, train_data, args, args.recovery_steps, args.recovery_lr, seed=2000 + seed,
                  label=f"{method} to {keep}")
            row["recovered"].append(held_out_loss(small, held_out))
            row["mb"], error = export_and_check(small, probe)
            errors.append(error)
    worst = max(errors)
    if worst >= EXPORT_TOLERANCE:
        raise AssertionError(f"an exported model's logits differ from the compressed model's by {worst:.2e}")

    base = rows[("none (trained on)", args.experts)]["compressed"]
    text = table(rows, args)
    print(f"\nbyte-level Qwen3-MoE ({args.layers} layers, hidden {args.dim}, {args.experts} experts of "
          f"{args.expert_dim}, top-2) trained {args.steps} steps: held-out loss {cell(base)}; compressed with "
          f"{args.calibration}×{args.batch} calibration windows of {args.length} bytes, recovery {args.recovery_steps}"
          f" steps at lr {args.recovery_lr}; medians (min–max) over {args.seeds} seeds\n")
    print(text)
    print(f"\nexport check: {len(errors)} exported models load in transformers with the compressed models' logits "
          f"(max |difference| {worst:.1e} < {EXPORT_TOLERANCE:.0e})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_experts.md").write_text(text + "\n")
    picture(rows, args, median(base), args.out / "compress_experts.png")
    print(f"wrote {args.out / 'compress_experts.md'} and {args.out / 'compress_experts.png'}")
    return {"rows": rows, "export_error": worst}


if __name__ == "__main__":
    main()
