"""Eager against CUDA graphs (``torch.compile(mode="reduce-overhead")``) for the floor and moefy's fused path.

    python benchmarks/cuda_graphs.py --repeats 40     # a CUDA GPU; bfloat16

moefy's fused token-choice forward on a GPU with grouped mm (compute capability ≥ 9.0) reads no expert counts
back to the host, so it compiles with ``fullgraph=True`` and replays as CUDA graphs, which removes the per-kernel
launch cost that bounds it in eager mode. Medians after warm-up; every ratio divides by the eager floor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import CASES, build, make_input  # noqa: E402


def median_ms(step, repeats: int, warmup: int = 8) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_step(model, case, x):
    """One eval forward (latency cases) or one forward+backward, starting a new CUDA-graph step each time."""
    if case.latency:
        model.eval()

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                model(x)
        return step
    xg, grad = x.clone().requires_grad_(True), torch.randn_like(x)
    params = list(model.parameters())

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        for p in params:
            p.grad = None
        xg.grad = None
        model(xg).backward(grad)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["A", "B", "C", "latency-1", "latency-8"], choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    print(f"Machine: {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16")
    print("| case | floor eager | floor graphs | fused eager | fused graphs | graphs vs eager (fused) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.cases:
        case = CASES[name]
        x = make_input(case, device="cuda", dtype=torch.bfloat16)
        ms = {}
        for variant in ("floor", "fused"):
            for graphs in (False, True):
                torch._dynamo.reset()
                model = build(case, variant, device="cuda", dtype=torch.bfloat16)
                run = torch.compile(model, mode="reduce-overhead", fullgraph=variant == "fused") if graphs else model
                ms[variant, graphs] = median_ms(make_step(run, case, x), args.repeats)
        floor = ms["floor", False]
        cells = [f"{ms[k]:.3f} ms ({ms[k] / floor:.2f}x)" for k in
                 (("floor", False), ("floor", True), ("fused", False), ("fused", True))]
        print(f"| {name} ({case.describe()}) | " + " | ".join(cells) +
              f" | {ms['fused', False] / ms['fused', True]:.2f}x faster |", flush=True)


if __name__ == "__main__":
    main()
