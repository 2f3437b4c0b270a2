"""Spawning a group of CPU ranks for the distributed tests (a helper, not a test file)."""
import os
import socket
import time
from typing import Callable, List

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``init_method="tcp://127.0.0.1:PORT"``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, args: tuple, world: int, out_dir: str, join_timeout: float) -> List[dict]:
    """Run ``worker(rank, *args)`` on ``world`` spawned processes; fail the test (and kill them) if they are not
    done in ``join_timeout`` s. Returns what each rank saved to ``out_dir/rank{r}.pt``, in rank order."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + join_timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {join_timeout} s (a hung collective?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
