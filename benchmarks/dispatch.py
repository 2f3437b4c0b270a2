"""Dispatch speed and memory against the dense floor (a dense MLP with the same active FLOPs).

    python benchmarks/dispatch.py                     # every case, timings + peak memory, markdown table
    python benchmarks/dispatch.py --cases C latency-1 --repeats 30 --no-memory

Times are medians over interleaved repeats (every variant runs once per round, in a rotating order), so
load from other processes hits all variants alike; each ratio divides by the floor's median of the same run.
Peak memory: one forward+backward per fresh process (``benchmarks/memory.py``), ``ru_maxrss``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import CASES, VARIANTS, build, make_input  # noqa: E402


def _fwd(model, x):
    with torch.no_grad():
        model(x)


def _fwd_bwd(model, x, grad):
    model(x).backward(grad)


def time_case(case, variants, repeats: int, warmup: int = 2):
    """{variant: {"fwd": [s...], "fwd+bwd": [s...]}} from interleaved rounds."""
    models = {v: build(case, v) for v in variants}
    x = make_input(case)
    times = {v: {"fwd": [], "fwd+bwd": []} for v in variants}
    if case.latency:
        for m in models.values():
            m.eval()
        kinds = ("fwd",)
        repeats *= 20  # microsecond timings: many more samples, each a few calls
        inner = 10
    else:
        xg, grad = x.clone().requires_grad_(True), torch.randn_like(x)
        kinds, inner = ("fwd", "fwd+bwd"), 1
    for r in range(warmup + repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            m = models[v]
            for kind in kinds:
                if kind == "fwd+bwd":
                    for p in m.parameters():
                        p.grad = None
                    xg.grad = None
                start = time.perf_counter()
                for _ in range(inner):
                    _fwd(m, x) if kind == "fwd" else _fwd_bwd(m, xg, grad)
                elapsed = (time.perf_counter() - start) / inner
                if r >= warmup:
                    times[v][kind].append(elapsed)
    return times


def peak_memory(case_name: str, variant: str) -> dict:
    """Peak RSS of one forward+backward, in a fresh process."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("memory.py")), case_name, variant],
                         check=True, capture_output=True, text=True).stdout
    peak, before = (float(v) for v in out.split())
    return {"peak": peak, "net": peak - before}


def spread(ts):
    """Relative half-width of the middle half: (q3 - q1) / (2 median)."""
    q = statistics.quantiles(ts, n=4)
    return (q[2] - q[0]) / (2 * statistics.median(ts))


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case (x20 for latency)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if v in args.variants]
    if "floor" not in variants:
        variants.insert(0, "floor")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32, load average before {os.getloadavg()[0]:.2f}")
    print(f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip())
    print()
    header = "| case | variant | fwd | fwd / floor | fwd+bwd | fwd+bwd / floor | ± | peak MB | net MB | net / floor |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    # memory first, while this process is small: a child inherits its parent's ru_maxrss across fork + exec
    mems = {name: {v: peak_memory(name, v) for v in variants}
            for name in args.cases if not args.no_memory and not CASES[name].latency}
    for name in args.cases:
        case = CASES[name]
        times = time_case(case, variants, args.repeats)
        med = {v: {k: statistics.median(ts) for k, ts in kinds.items() if ts} for v, kinds in times.items()}
        mem = mems.get(name, {})
        for v in variants:
            row = [f"{name} ({case.describe()})" if v == "floor" else "", v]
            row += [fmt_time(med[v]["fwd"]), f"{med[v]['fwd'] / med['floor']['fwd']:.2f}"]
            if "fwd+bwd" in med[v]:
                main_kind = "fwd+bwd"
                row += [fmt_time(med[v]["fwd+bwd"]), f"**{med[v]['fwd+bwd'] / med['floor']['fwd+bwd']:.2f}**"]
            else:
                main_kind = "fwd"
                row += ["–", "–"]
            row.append(f"{spread(times[v][main_kind]):.0%}")
            if mem:
                row += [f"{mem[v]['peak']:.0f}", f"{mem[v]['net']:.0f}",
                        f"{mem[v]['net'] / mem['floor']['net']:.2f}"]
            else:
                row += ["–", "–", "–"]
            print("| " + " | ".join(row) + " |", flush=True)
    print()
    print(f"load average after {os.getloadavg()[0]:.2f}; ± = (q3 - q1) / (2 median) of the main timing; "
          "net MB = peak RSS minus RSS before the forward (the peak includes ~torch's own footprint)")


if __name__ == "__main__":
    main()
