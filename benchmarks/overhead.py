"""Where a routed layer's time over the dense floor goes: its pieces timed alone, as ratios to the floor.

    python benchmarks/overhead.py                  # case C, fused experts
    python benchmarks/overhead.py --case B --variant generic

Forward+backward medians of interleaved rounds, each divided by the floor's median of the same run:

- ``layer``: the whole block;
- ``router``: routing alone (gate, scores, top-k, sort, counts), backward through the combine weights;
- ``experts``: the experts alone on rows already grouped by expert (the routing of the first call);
- ``gather+combine``: ``index_select`` of the rows and the weighted ``index_add_`` back, no experts.

Then the first expert layer's matmuls alone, forward only (E ``addmm`` on their slices, each writing into
one buffer) against the floor's one ``addmm`` with the same FLOPs, and against one ``bmm`` over E equal
slices: on 1 and on the default threads. The script re-runs itself with ``benchmarks/dispatch.py``'s malloc
thresholds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import MALLOC_ENV  # noqa: E402
from models import CASES, build, make_input  # noqa: E402

from moefy.dispatch.combine import combine  # noqa: E402
from moefy.dispatch.fused import fused_experts_forward  # noqa: E402


def medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """{name: median seconds}, every function once per round in a rotating order."""
    names, times = list(fns), {n: [] for n in fns}
    for r in range(warmup + repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[n]()
            if r >= warmup:
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(ts) for n, ts in times.items()}


def pieces(case, variant: str):
    floor, block = build(case, "floor"), build(case, variant)
    x = make_input(case).requires_grad_(True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        routing = block.route_rows(x)
    counts = routing.counts[:case.experts]
    rows = x.detach().index_select(0, routing.token_index)
    rows_grad = grad.index_select(0, routing.token_index)

    def experts():
        r = rows.detach().requires_grad_(True)
        if block.fused:
            out = fused_experts_forward(block.experts, block._fused_layout, r, counts, routing.expert_index)
        else:
            out = torch.cat([e(chunk) for e, chunk in zip(block.experts, r.split(counts))])
        out.backward(rows_grad)

    def router():
        block.route_rows(x).weight.sum().backward()

    def gather_combine():
        w = routing.weight.detach().requires_grad_(True)
        combine(x.index_select(0, routing.token_index), routing.token_index, w, x.shape[0]).backward(grad)

    return {"floor": lambda: floor(x).backward(grad), "layer": lambda: block(x).backward(grad),
            "router": router, "experts": experts, "gather+combine": gather_combine}


def first_layer_matmuls(case):
    rows, share = case.tokens * case.k, case.tokens * case.k // case.experts
    x = torch.randn(rows, case.dim)
    weights = [torch.randn(case.hidden, case.dim) for _ in range(case.experts)]
    biases = [torch.randn(case.hidden) for _ in range(case.experts)]
    y = torch.empty(rows, case.hidden)
    floor_w, floor_b = torch.randn(case.k * case.hidden, case.dim), torch.randn(case.k * case.hidden)
    stacked = torch.stack([w.t() for w in weights])

    def loop():
        for w, b, x_e, y_e in zip(weights, biases, x.split(share), y.split(share)):
            torch.addmm(b, x_e, w.t(), out=y_e)

    return {"floor": lambda: torch.addmm(floor_b, x[:case.tokens], floor_w.t()), f"{case.experts} addmm": loop,
            "one bmm": lambda: torch.baddbmm(torch.stack(biases)[:, None], x.view(case.experts, share, -1), stacked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="C", choices=[n for n, c in CASES.items() if not c.latency])
    parser.add_argument("--variant", default="fused", choices=["generic", "fused"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    case = CASES[args.case]
    print(f"{args.case} ({case.describe()}), {args.variant}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward+backward / floor:")
    med = medians(pieces(case, args.variant), args.repeats)
    for name, t in med.items():
        print(f"  {name:15s} {t * 1e3:7.1f} ms  {t / med['floor']:.2f}")
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        med = medians(first_layer_matmuls(case), args.repeats)
        print(f"first expert layer alone, forward, {threads} thread(s), / the floor's first layer:")
        for name, t in med.items():
            print(f"  {name:15s} {t * 1e3:7.2f} ms  {t / med['floor']:.2f}")


if __name__ == "__main__":
    main()
