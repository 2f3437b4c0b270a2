"""A small Llama, moefied, trained on Python's own source code, exported to Mixtral and reloaded by transformers.

    python examples/llama_to_mixtral.py            # about 2-3 minutes on 2 CPU cores

1. build a 4-layer Llama from a config (random weights, byte-level: vocab 256, no tokenizer file);
2. moefy every decoder MLP into 4 experts, top-2 (copies + 10 % noise, switch balance loss);
3. train 600 steps on the source of some standard-library modules (read from disk: offline);
4. pictures to images/: each layer's expert load, and which experts a line of code goes to in every layer;
5. moefy.hf.export → a Mixtral checkpoint; transformers' AutoModelForCausalLM loads it (no moefy);
6. greedy generation with both models: the same bytes.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import transformers  # noqa: E402

import moefy  # noqa: E402
from stdlib_text import MODULES, stdlib_bytes, windows  # noqa: E402
from moefy.viz import plot_load_heatmap, plot_token_routing  # noqa: E402

PROMPT = "def __init__(self, "
SNIPPET = "    for key, value in sorted(kwargs.items()):\n        setattr(self, key, value)\n"


def build(args) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=2 * args.dim,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.length, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg)
    return moefy.moefy(model, args.experts, k=2, target="mlp", expert_noise=0.1, aux_criterion={"switch": 0.01})


def train(model, data: torch.Tensor, args) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    losses = []
    bar = tqdm(windows(data, args.steps, args.batch, args.length, args.seed), total=args.steps, desc="train")
    for ids in bar:
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        (loss + moefy.aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def held_out_loss(model, data: torch.Tensor, args) -> float:
    model.eval()
    with torch.no_grad():
        ids = next(windows(data, 1, 32, args.length, seed=args.seed + 1))
        return model(ids, labels=ids).loss.item()


def pictures(model, data: torch.Tensor, args, out: Path) -> list:
    """Expert load of every layer over held-out windows, and the routing of one line of code per layer."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with moefy.RoutingRecorder(model) as rec, torch.no_grad():
        for ids in windows(data, 4, 16, args.length, seed=args.seed + 2):
            model(ids)
    fig = plot_load_heatmap(rec)
    fig.suptitle("moefied Llama, held-out stdlib source", fontsize=10)
    paths = [out / "llama_mixtral_load.png"]
    fig.savefig(paths[0], dpi=args.dpi, bbox_inches="tight")
    ids = torch.tensor([list(SNIPPET.encode("utf-8"))])
    with torch.no_grad():
        model(ids)
    fig = plot_token_routing([chr(b) for b in ids[0].tolist()], model)
    paths.append(out / "llama_mixtral_tokens.png")
    fig.savefig(paths[1], dpi=args.dpi, bbox_inches="tight")
    return paths


def generate(model, args) -> str:
    ids = torch.tensor([list(PROMPT.encode("utf-8"))])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "images")
    parser.add_argument("--export-dir", type=Path, default=None, help="where the Mixtral checkpoint goes "
                        "(default: a temporary folder)")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = stdlib_bytes()
    split = int(0.95 * len(data))
    print(f"text: {len(data):,} bytes of the source of {', '.join(MODULES)}")
    model = build(args)
    losses = train(model, data[:split], args)
    loss = held_out_loss(model, data[split:], args)
    print(f"trained {args.steps} steps: train loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
          f"held-out loss {loss:.3f} ({loss / math.log(2):.2f} bits per byte)")
    for path in pictures(model, data[split:], args, args.out):
        print(f"wrote {path}")

    folder = args.export_dir or Path(tempfile.mkdtemp(prefix="mixtral-"))
    moefy.hf.export(model, folder)
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = next(windows(data[split:], 1, 4, args.length, seed=args.seed + 3))
    with torch.no_grad():
        error = (mixtral(ids).logits - model(ids).logits).abs().max().item()
    print(f"exported to {folder}: transformers loads a {type(mixtral).__name__} "
          f"({mixtral.config.num_local_experts} experts, top-{mixtral.config.num_experts_per_tok}); "
          f"max |logit difference| = {error:.2e}")
    ours, theirs = generate(model, args), generate(mixtral, args)
    print(f"moefied Llama generates: {ours!r}\nMixtral generates:       {theirs!r}")
    print("the same bytes" if ours == theirs else "THE GENERATIONS DIFFER")
    return {"error": error, "same": ours == theirs, "losses": losses, "held_out": loss}


if __name__ == "__main__":
    main()
