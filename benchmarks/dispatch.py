"""Dispatch speed and memory against the dense floor (a dense MLP with the same active FLOPs).

    python benchmarks/dispatch.py                     # every case, timings + peak memory, markdown table
    python benchmarks/dispatch.py --cases C latency-1 --repeats 30 --no-memory
    python benchmarks/dispatch.py --device cuda --dtype bfloat16     # on a GPU (fused: torch._grouped_mm)

Times are medians over interleaved repeats (every variant runs once per round, in a rotating order), so
load from other processes hits all variants alike; each ratio divides by the floor's median of the same run.
The script re-runs itself with glibc's malloc thresholds fixed (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``; ``--default-malloc`` keeps the defaults). With glibc adapting them as it goes, the
floor's own time moved by up to 25 % from one process to the next (likely: some processes return its large
activations to the OS and fault them back in every step); with them fixed, by 1-2 %.
Peak memory: one forward+backward per fresh process (``benchmarks/memory.py``), ``ru_maxrss``; on CUDA,
``torch.cuda.max_memory_allocated`` of one forward+backward in this process.
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


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_case(case, variants, repeats: int, warmup: int = 2, device: str = "cpu", dtype=torch.float32):
    """{variant: {"fwd": [s...], "fwd+bwd": [s...]}} from interleaved rounds."""
    models = {v: build(case, v, device=device, dtype=dtype) for v in variants}
    x = make_input(case, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
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
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    _fwd(m, x) if kind == "fwd" else _fwd_bwd(m, xg, grad)
                sync()
                elapsed = (time.perf_counter() - start) / inner
                if r >= warmup:
                    times[v][kind].append(elapsed)
    return times


def peak_memory(case_name: str, variant: str, dtype: str = "float32") -> dict:
    """Peak RSS of one forward+backward, in a fresh process."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("memory.py")), case_name, variant, dtype],
                         check=True, capture_output=True, text=True).stdout
    peak, before = (float(v) for v in out.split())
    return {"peak": peak, "net": peak - before}


def cuda_peak_memory(case, variant: str, dtype) -> dict:
    """Peak CUDA memory of one forward+backward (MB): ``peak`` = max allocated, ``net`` = minus the layer and input."""
    model = build(case, variant, device="cuda", dtype=dtype)
    x = make_input(case, device="cuda", dtype=dtype).requires_grad_(True)
    grad = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model(x).backward(grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, x, grad
    return {"peak": peak / 2**20, "net": (peak - before) / 2**20}


def spread(ts):
    """Relative half-width of the middle half: (q3 - q1) / (2 median)."""
    if len(ts) < 2:
        return float("nan")
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds")
    args = parser.parse_args()
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if v in args.variants]
    if "floor" not in variants:
        variants.insert(0, "floor")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    where = f"{torch.cuda.get_device_name()}, host {cpu}" if cuda else \
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    malloc = "default malloc" if args.default_malloc else " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    print(f"Machine: {where}, torch {torch.__version__}, {args.dtype}, {malloc}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    print(f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip())
    print()
    header = "| case | variant | fwd | fwd / floor | fwd+bwd | fwd+bwd / floor | ± | peak MB | net MB | net / floor |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    # memory first, while this process is small: a child inherits its parent's ru_maxrss across fork + exec
    measure = (lambda name, v: cuda_peak_memory(CASES[name], v, dtype)) if cuda else \
        (lambda name, v: peak_memory(name, v, args.dtype))
    mems = {name: {v: measure(name, v) for v in variants}
            for name in args.cases if not args.no_memory and not CASES[name].latency}
    for name in args.cases:
        case = CASES[name]
        times = time_case(case, variants, args.repeats, device=args.device, dtype=dtype)
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
    print(f"load average after {os.getloadavg()[0]:.2f}; ± = (q3 - q1) / (2 median) of the main timing; " +
          ("net MB = peak minus memory before the forward" if cuda else
           "net MB = peak RSS minus RSS before the forward (the peak includes ~torch's own footprint)"))


if __name__ == "__main__":
    main()
