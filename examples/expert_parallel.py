"""Expert parallelism: train a mixture whose experts are split over processes, then reload it in one.

    torchrun --nproc_per_node=2 examples/expert_parallel.py [--steps 300] [--experts 4]
    python examples/expert_parallel.py            # the same on one process

Every rank holds the router and the dense layers (replicated, averaged by DDP) and experts/W experts
(sharded: gradients stay on their rank). Each rank trains on its own shard of scikit-learn's bundled digits,
saves its own checkpoint shard, and rank 0 merges the shards and reloads the whole mixture in a plain,
single-process model to check that every expert landed where it belongs (same test accuracy).
Backend: NCCL when CUDA is available, else gloo.
"""
import argparse
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from moefy.block import MoEBlock
from moefy.parallel import expert_parallel, merge_state_dicts, sharded_names


class MLPMixture(MoEBlock):
    def __init__(self, dim: int, hidden: int, num_experts: int, **routing):
        experts = [nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                   for _ in range(num_experts)]
        super().__init__(experts=experts, input_dim=dim, **routing)

    def expert_forward(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return expert(x)


class Classifier(nn.Module):
    """8×8 digit → 10 logits; the middle layer is a mixture of MLP experts with a residual connection."""

    def __init__(self, num_experts: int, k: int, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.moe = MLPMixture(dim, hidden, num_experts, k=k, aux_criterion="switch")
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) → (B, 10)
        h = F.gelu(self.embed(x))
        return self.head(h + self.moe(h))


def init_distributed() -> None:
    if "RANK" not in os.environ:  # plain `python`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(minutes=2))


def digits(device: torch.device):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@torch.no_grad()
def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(-1) == y).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--experts", type=int, default=4, help="divisible by the number of processes")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same model on every rank: replicated parts agree, each rank keeps its experts

    model = Classifier(args.experts, args.k).to(device)
    ep_group = dist.new_group(backend=dist.get_backend())  # experts exchange apart from DDP's all-reduce
    expert_parallel(model, group=ep_group)
    DDP._set_params_and_buffers_to_ignore_for_model(model, sharded_names(model))
    ddp = DDP(model)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)

    (x_train, y_train), (x_test, y_test) = digits(device)
    x_train, y_train = x_train[rank::world], y_train[rank::world]  # this rank's shard of the data
    gen = torch.Generator().manual_seed(rank)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), disable=rank != 0, desc=f"rank 0 of {world}"):
        idx = torch.randint(0, len(y_train), (args.batch,), generator=gen).to(device)
        loss = F.cross_entropy(ddp(x_train[idx]), y_train[idx]) + 1e-2 * model.moe.aux_loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    elapsed = time.perf_counter() - start

    model.eval()
    mine = torch.tensor([correct(model, x_test[rank::world], y_test[rank::world])], device=device)
    dist.all_reduce(mine)
    accuracy = mine.item() / len(y_test)

    ckpt_dir = (args.checkpoint_dir or tempfile.mkdtemp(prefix="moefy-ep-")) if rank == 0 else None
    box = [ckpt_dir]
    dist.broadcast_object_list(box)
    ckpt_dir = box[0]
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(ckpt_dir, f"rank{rank}.pt"))  # keys carry global expert ids
    dist.barrier()
    if rank == 0:
        shards = [torch.load(os.path.join(ckpt_dir, f"rank{r}.pt"), map_location="cpu") for r in range(world)]
        single = Classifier(args.experts, args.k)  # a plain model: all experts, no torch.distributed
        single.load_state_dict(merge_state_dicts(shards))
        reloaded = correct(single.eval(), x_test.cpu(), y_test.cpu()) / len(y_test)
        samples = args.steps * args.batch * world
        print(f"{world} process(es), {args.experts} experts ({args.experts // world} per rank), k={args.k}: "
              f"{samples / elapsed:.0f} samples/s, final loss {loss.item():.3f}")
        print(f"test accuracy: {accuracy:.3f} sharded, {reloaded:.3f} reloaded in one process from {ckpt_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
