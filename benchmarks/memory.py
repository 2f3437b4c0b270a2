"""Peak memory of one forward+backward of one variant, in this (fresh) process.

    python benchmarks/memory.py A generic [bfloat16]     # prints "peak_MB rss_before_forward_MB"

``peak`` is ``ru_maxrss`` after the step; ``before`` is the RSS once the layer and its input exist, so
``peak - before`` is what the forward+backward itself added (activations, gradients, dispatch buffers).
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import CASES, build, make_input  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    case, variant = CASES[sys.argv[1]], sys.argv[2]
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.float32
    model = build(case, variant, dtype=dtype)
    x = make_input(case, dtype=dtype).requires_grad_(True)
    grad = torch.randn_like(x)
    before = rss_mb()
    model(x).backward(grad)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/status") as f:  # cross-check: this process image's own high-water mark
        hwm = next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM"))
    if peak > hwm + 16:
        print(f"warning: ru_maxrss {peak:.0f} MB > VmHWM {hwm:.0f} MB: inherited from the parent", file=sys.stderr)
    print(f"{peak:.1f} {before:.1f}")


if __name__ == "__main__":
    main()
