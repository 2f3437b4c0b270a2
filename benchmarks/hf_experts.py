"""An imported Hugging Face MoE model (``moefy.hf.from_hf(model)``, default options) beside every transformers
experts implementation, on the same weights.

    python benchmarks/hf_experts.py                      # Qwen3-MoE-like: hidden 256, 32 experts, top-4, 2 layers
    python benchmarks/hf_experts.py --cases decode-1 decode-16 --repeats 400

Variants, each a whole ``Qwen3MoeForCausalLM`` with the same weights:

- ``eager`` / ``grouped_mm`` / ``batched_mm``: transformers' experts implementations
  (``model.set_experts_implementation(...)``, ``transformers/integrations/moe.py``);
- ``moefy``: a copy of the model after ``moefy.hf.from_hf(model)`` (default options);
- ``dense``: the floor, a ``Qwen3ForCausalLM`` with the same attention and an MLP of hidden k·h (the same
  active FLOPs per token as the MoE layers).

Cases:

- ``train``: ``model(input_ids, labels=input_ids).loss.backward()`` on B×L tokens (train mode);
- ``decode-B``: one decoding step of B sequences, eval, no grad: one new token per sequence through the whole
  model (``model(input_ids=(B, 1), past_key_values=cache)``, as ``generate`` calls it) with a KV cache
  (``DynamicCache``) holding a prefill of ``--prefill`` tokens; the cache is cropped back to the prefill outside the
  timed region, so every step sees the same cache length.

The machine is shared: a run whose ``±`` column reads more than ~10 % was disturbed (2 threads wait on each other
when another process holds a core); rerun it when the load average is low.

Times are medians over interleaved rounds (every variant once per round, in a rotating order), so load from other
processes hits all variants alike; ratios divide by the median of transformers' fastest implementation in the
same run (``/ fastest``) and by the dense floor's (``/ dense``). The script re-runs itself with
``benchmarks/dispatch.py``'s fixed malloc thresholds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import MALLOC_ENV, fmt_time, spread  # noqa: E402

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
VARIANTS = ("dense", *IMPLEMENTATIONS, "moefy")
CASES = ("train", "decode-1", "decode-16")


def configs(args):
    """(Qwen3MoeConfig, the FLOP-matched dense Qwen3Config)."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=args.hidden // 4, vocab_size=args.vocab,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    moe = Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.k,
                         moe_intermediate_size=args.expert_hidden, intermediate_size=args.expert_hidden * args.k,
                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    dense = Qwen3Config(**common, intermediate_size=args.expert_hidden * args.k)
    return moe, dense


def build(args):
    """{variant: model}, every MoE variant with the same weights."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    import moefy.hf
    moe_config, dense_config = configs(args)
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(moe_config)  # transformers' init: a near-uniform router, balanced loads
    models = {}
    for impl in IMPLEMENTATIONS:
        models[impl] = copy.deepcopy(base)
        models[impl].set_experts_implementation(impl)
    models["moefy"] = moefy.hf.from_hf(copy.deepcopy(base))
    torch.manual_seed(0)
    models["dense"] = Qwen3ForCausalLM(dense_config)
    return models


@torch.no_grad()
def check_same(models, ids) -> float:
    """Max |logits - grouped_mm's logits| over the MoE variants (they share weights: ~1e-6)."""
    ref = models["grouped_mm"].eval()(ids).logits
    worst = max((models[v].eval()(ids).logits - ref).abs().max().item() for v in ("eager", "batched_mm", "moefy"))
    for m in models.values():
        m.train()
    return worst


def step_fns(case: str, models, args):
    """{variant: zero-argument callable running one timed step}, and a callable run untimed after each step."""
    g = torch.Generator().manual_seed(1)
    if case == "train":
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        for m in models.values():
            m.train()

        def train(m):
            def step():
                for p in m.parameters():
                    p.grad = None
                m(input_ids=ids, labels=ids).loss.backward()
            return step
        return {v: train(m) for v, m in models.items()}, (lambda v: None)
    from transformers import DynamicCache
    batch = int(case.split("-")[1])
    prompt = torch.randint(0, args.vocab, (batch, args.prefill), generator=g)
    new = torch.randint(0, args.vocab, (batch, 1), generator=g)
    caches = {}
    for v, m in models.items():
        m.eval()
        caches[v] = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=prompt, past_key_values=caches[v], use_cache=True)

    def decode(v, m):
        def step():
            with torch.no_grad():
                m(input_ids=new, past_key_values=caches[v], use_cache=True)
        return step
    return {v: decode(v, m) for v, m in models.items()}, (lambda v: caches[v].crop(-1))


def time_case(case: str, models, args):
    """{variant: [seconds per step, ...]} from interleaved rounds."""
    fns, after = step_fns(case, models, args)
    variants = list(fns)
    decode = case != "train"
    repeats, warmup, inner = (args.repeats, 20, 5) if decode else (args.train_repeats, 1, 1)
    times = {v: [] for v in variants}
    for r in range(warmup + repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            elapsed = 0.0
            for _ in range(inner):
                start = time.perf_counter()
                fns[v]()
                elapsed += time.perf_counter() - start
                after(v)
            if r >= warmup:
                times[v].append(elapsed / inner)
    return times


def describe(case: str, args) -> str:
    if case == "train":
        return f"train fwd+bwd, {args.batch}×{args.seq} tokens"
    return f"decode, batch {case.split('-')[1]}, 1 new token each, KV cache of {args.prefill}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=200, help="decode: timed rounds of 5 steps per variant")
    parser.add_argument("--train-repeats", type=int, default=5, help="train: timed rounds of one step per variant "
                        "(batched_mm's training step takes ~10 s on 2 cores)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="num_experts_per_tok")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="train: sequences")
    parser.add_argument("--seq", type=int, default=256, help="train: tokens per sequence")
    parser.add_argument("--prefill", type=int, default=32, help="decode: tokens already in the KV cache")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds")
    args = parser.parse_args()
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    import transformers

    models = build(args)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    print(f"Machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, float32, load average before {os.getloadavg()[0]:.2f}")
    print(f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip())
    print(f"Model: Qwen3-MoE, hidden {args.hidden}, {args.experts} experts of hidden {args.expert_hidden}, "
          f"top-{args.k}, {args.layers} layers, vocab {args.vocab}; dense floor: MLP hidden {args.k * args.expert_hidden}")
    worst = check_same(models, torch.randint(0, args.vocab, (2, 16), generator=torch.Generator().manual_seed(2)))
    print(f"max |logits - grouped_mm's| over eager, batched_mm, moefy: {worst:.1e}")
    print()
    header = "| case | variant | time | / fastest | / dense | ± |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for case in args.cases:
        times = time_case(case, models, args)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        fastest = min(IMPLEMENTATIONS, key=med.get)
        for v in VARIANTS:
            ratio = f"{med[v] / med[fastest]:.2f}"
            row = [describe(case, args) if v == VARIANTS[0] else "", v + (" (fastest)" if v == fastest else ""),
                   fmt_time(med[v]), f"**{ratio}**" if v == "moefy" else ratio, f"{med[v] / med['dense']:.2f}",
                   f"{spread(times[v]):.0%}"]
            print("| " + " | ".join(row) + " |", flush=True)
    print()
    print(f"load average after {os.getloadavg()[0]:.2f}; / fastest = over transformers' fastest experts "
          f"implementation in this run; ± = (q3 - q1) / (2 median)")


if __name__ == "__main__":
    main()
