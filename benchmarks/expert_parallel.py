"""Token throughput of an expert-parallel mixture: one process vs W processes (gloo on CPU), forward + backward.

    python benchmarks/expert_parallel.py [--tokens 2048] [--worlds 1,2] [--threads 1] [--repeats 3]

Weak scaling, as data parallelism runs: every process routes ``--tokens`` tokens per step, and the
throughput is all processes' tokens over the slowest process's wall time. Rows:

- ``plain``: the unsharded MoEBlock in one process, no torch.distributed;
- ``expert-parallel W``: W processes, E/W experts each, tokens exchanged with all_to_all over gloo
  (W = 1 measures the machinery alone).

Every configuration runs ``--repeats`` times, interleaved, in fresh processes; the table shows the median.
On a machine with fewer free cores than processes the processes share cores and no speed-up can show.
"""
import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moefy.parallel import expert_parallel
from models import MLPMixture  # benchmarks/models.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, plain: bool, args, results) -> None:
    torch.set_num_threads(args.threads)
    if not plain:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=5))
    torch.manual_seed(0)
    block = MLPMixture(args.dim, args.hidden, args.experts, k=args.k, aux_criterion="switch")
    if not plain:
        expert_parallel(block)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))

    def step():
        block.zero_grad(set_to_none=True)
        (block(x).square().mean() + block.aux_loss).backward()

    for _ in range(args.warmup):
        step()
    if not plain:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if not plain:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        results.put(float(elapsed))


def measure(world: int, plain: bool, args) -> float:
    """Seconds for ``args.steps`` steps on ``world`` fresh processes (the slowest one)."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_run, args=(world, _free_port(), plain, args, results), nprocs=world,
                       start_method="spawn")
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per process per step")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--worlds", default="1,2", help="process counts to measure, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    configs = [("plain", 1, True)] + [(f"expert-parallel {w}", w, False) for w in map(int, args.worlds.split(","))]
    times = {name: [] for name, _, _ in configs}
    for _ in range(args.repeats):
        for name, world, plain in configs:
            times[name].append(measure(world, plain, args))

    print(f"T={args.tokens} tokens/process, D={args.dim}, hidden={args.hidden}, E={args.experts}, k={args.k}, "
          f"fwd+bwd, {args.threads} thread(s)/process, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| setup | processes | tokens/s (median) | ms/step | runs (tokens/s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, world, _ in configs:
        rates = [world * args.tokens * args.steps / t for t in times[name]]
        median = statistics.median(rates)
        runs = ", ".join(f"{r:.0f}" for r in rates)
        print(f"| {name} | {world} | {median:.0f} | {1000 * world * args.tokens / median:.0f} | {runs} |")


if __name__ == "__main__":
    main()
