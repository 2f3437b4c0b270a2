"""Expert parallelism on 2 and 4 gloo processes (127.0.0.1) against the same model in one process.

Every rank of a spawned group builds the same model (same seed), shards it with ``expert_parallel``, wraps
it in DDP (sharded experts ignored), runs its slice of a shared batch and saves outputs, aux losses and
gradients; the test recomputes everything in this process on the whole batch and compares. Each rank's loss
is ``W · sum(y · probe) + aux``, so after DDP averages the replicated gradients, every gradient must equal
the single-process gradient of ``sum(y · probe) + aux``.

Time is bounded twice: collectives time out after COLLECTIVE_TIMEOUT s, and the group is killed after
JOIN_TIMEOUT s.
"""
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gloo_ranks import free_port, run_ranks
from moefy.block import MoEBlock
from moefy.parallel import (ShardedExperts, expert_parallel, full_state_dict, merge_state_dicts,
                            sharded_names)

COLLECTIVE_TIMEOUT = 30
JOIN_TIMEOUT = 120
HANG_TIMEOUT = 2
DIM, OUT, SEQ = 6, 5, 3


class MLPMixture(MoEBlock):
    def __init__(self, dim: int, out: int, num_experts: int, num_shared: int = 0, **routing):
        experts = [nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, out)) for _ in range(num_experts)]
        shared = [nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, out)) for _ in range(num_shared)]
        super().__init__(experts=experts, input_dim=dim, shared_experts=shared or None, **routing)

    def expert_forward(self, expert, x):
        return expert(x)


class Net(nn.Module):
    """A replicated layer in front of the mixture, so gradients must cross the exchange to reach it."""

    def __init__(self, num_experts: int, **routing):
        super().__init__()
        self.pre = nn.Linear(DIM, DIM)
        self.moe = MLPMixture(DIM, OUT, num_experts, **routing)

    def forward(self, x):
        return self.moe(self.pre(x))


@dataclass
class Case:
    name: str
    num_experts: int
    sizes: Tuple[int, ...]  # samples (B) per rank, each (SEQ, DIM)
    routing: Dict = field(default_factory=dict)
    skew: bool = False  # every token avoids the second half of the experts (their ranks only send)
    train: bool = True
    double: bool = True
    aux_scope: str = "global"
    checkpoint: bool = False


CASES_2 = [
    Case("topk2_mean_float32", 4, (3, 2), dict(k=2, aggregation="mean", aux_criterion=["switch", "z", "entropy",
                                                                                        "balance"]),
         double=False, checkpoint=True),
    Case("hole_skewed_gaussian", 4, (4, 4), dict(k=2, hole=True, noise="gaussian",
                                                 aux_criterion={"cv2": 0.5, "prob": 1.0}), skew=True, train=False),
    Case("rank_without_tokens", 4, (5, 0), dict(k=1, hole=True, aux_criterion="switch")),
    Case("samples_local_aux", 4, (3, 5), dict(k=2, route="samples", aux_criterion=["entropy", "z"]),
         aux_scope="local"),
    # DeepSeek-V3 routing with a gated shared expert: the shared expert is replicated, the routed ones sharded
    Case("groups_bias_shared_gate", 4, (3, 2), dict(k=2, n_group=2, topk_group=1, score_func="sigmoid",
                                                    selection_bias=True, routed_scaling_factor=2.0, num_shared=1,
                                                    shared_gate=True, aux_criterion="switch")),
    Case("global_switch", 4, (3, 2), dict(k=2, hole=True, aux_criterion={"global_switch": 1.0, "z": 0.1})),
    Case("seq_balance_local", 4, (3, 2), dict(k=2, aux_criterion="seq_balance"), aux_scope="local"),
]
CASES_4 = [
    Case("four_ranks_skewed", 8, (2, 0, 3, 4), dict(k=2, hole=True, aux_criterion=["switch", "z"]), skew=True),
]


def build(case: Case) -> Net:
    torch.manual_seed(0)
    net = Net(case.num_experts, **case.routing)
    if case.skew:
        with torch.no_grad():
            net.pre.weight[0], net.pre.bias[0] = 0.0, 10.0  # feature 0 of every token is 10
            gate = net.moe.router.gate.weight
            gate[case.num_experts // 2: case.num_experts] = gate[0] - torch.eye(DIM)[0]  # 10 below expert 0
    bias = net.moe.router.score_correction_bias
    if bias is not None:
        bias.copy_(torch.linspace(-0.2, 0.2, bias.numel()))
    net = net.double() if case.double else net
    return net.train(case.train)


def batch(case: Case):
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if case.double else torch.float32
    x = torch.randn(sum(case.sizes), SEQ, DIM, generator=g).to(dtype)
    probe = torch.randn(sum(case.sizes), SEQ, OUT, generator=g).to(dtype)
    return x, probe


def rank_slice(case: Case, rank: int) -> slice:
    start = sum(case.sizes[:rank])
    return slice(start, start + case.sizes[rank])


# ---------------------------------------------------------------------------------------------- the ranks
def run_case(case: Case, rank: int, world: int, group) -> dict:
    net = expert_parallel(build(case), group=group, aux_scope=case.aux_scope)
    DDP._set_params_and_buffers_to_ignore_for_model(net, sharded_names(net))
    model = DDP(net)
    x_all, probe_all = batch(case)
    x, probe = x_all[rank_slice(case, rank)].clone().requires_grad_(), probe_all[rank_slice(case, rank)]
    y = model(x)
    (world * (y * probe).sum() + net.moe.aux_loss).backward()
    out = dict(y=y.detach(), aux=net.moe.aux_loss.detach(), x_grad=x.grad,
               aux_losses={k: v.detach() for k, v in net.moe.aux_losses.items()},
               grads={n: p.grad.clone() for n, p in net.named_parameters()}, counts=net.moe.routing.counts,
               experts=list(net.moe.experts.global_ids), sharded=sharded_names(net))
    if case.checkpoint:
        torch.optim.SGD(net.parameters(), lr=0.1).step()
        out["shard"] = net.state_dict()
        out["full"] = full_state_dict(net, group)
        with torch.no_grad():
            out["y_after"] = net.eval()(x)
    return out


def data_parallel_global_balance(rank: int, world: int) -> dict:
    """Replicated experts (no EP), global_switch counts all-reduced over the world: two micro-batches."""
    torch.manual_seed(0)
    block = MLPMixture(DIM, OUT, 4, k=2, aux_criterion="global_switch")
    block.global_balance.group = dist.group.WORLD
    x_all, _ = batch(Case("dp", 4, (2, 2), double=False))
    losses = []
    for micro in (slice(0, 2), slice(2, 4)):
        block(x_all[micro][rank:rank + 1])
        losses.append(block.aux_loss.detach())
    return dict(counts=block.global_balance.counts.clone(), losses=losses)


def bias_balance(rank: int, group) -> dict:
    """Aux-loss-free bias updates with the counts all-reduced over the ranks: replicated experts (data
    parallel, two micro-batches per rank) and sharded ones (expert parallel)."""
    from moefy.routing import update_selection_bias
    x_all, _ = batch(Case("dp", 4, (2, 2), double=False))
    out = {}
    for name in ("dp", "ep"):
        torch.manual_seed(0)
        block = MLPMixture(DIM, OUT, 4, k=2, selection_bias=True, bias_update_rate=0.1)
        net = expert_parallel(block, group=group) if name == "ep" else block
        for micro in (slice(0, 2), slice(2, 4)):
            net(x_all[micro][rank:rank + 1])
        counts = update_selection_bias(net, group=dist.group.WORLD if name == "dp" else group)
        out[name] = dict(counts=next(iter(counts.values())), bias=block.router.score_correction_bias.clone())
    return out


def expert_parallel_replay(rank: int, group) -> dict:
    """Router replay on sharded experts with training noise: each rank replays its own tokens' picks."""
    from moefy.routing import RouterReplay
    net = expert_parallel(build(Case("replay", 4, (2, 2), dict(k=2, noise="gumbel"), double=False)), group=group)
    x = batch(Case("replay", 4, (2, 2), double=False))[0][rank * 2:(rank + 1) * 2]
    replay = RouterReplay(net)
    with replay.record():
        y = net(x)
    recorded = net.moe.routing.indices.clone()
    torch.manual_seed(100 + rank)
    fresh = net(x)
    with replay.replay(weights="frozen"):
        again = net(x)
    return dict(same=torch.equal(net.moe.routing.indices, recorded), y=y.detach(), again=again.detach(),
                fresh_differs=not torch.equal(fresh, y))


def _worker(rank: int, world: int, port: int, cases: List[Case], out_dir: str, load: Optional[str]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        group = dist.new_group()  # experts exchange on their own group, DDP on the default one
        results = {case.name: run_case(case, rank, world, group) for case in cases}
        try:  # 3 experts cannot be split over the group: a clear error, raised before any collective
            expert_parallel(MLPMixture(DIM, OUT, 3), group=group)
        except ValueError as err:
            results["indivisible_error"] = str(err)
        if world == 2:  # rank 1 skips a forward: rank 0's collective must fail after the group's timeout
            short = dist.new_group(timeout=timedelta(seconds=HANG_TIMEOUT))
            net = expert_parallel(MLPMixture(DIM, OUT, 2), group=short)
            if rank == 0:
                start = time.monotonic()
                try:
                    net(torch.randn(4, DIM))
                except RuntimeError as err:
                    results["hang"] = (str(err), time.monotonic() - start)
            dist.barrier()
        if world == 2:
            results["dp_global_balance"] = data_parallel_global_balance(rank, world)
            results["ep_replay"] = expert_parallel_replay(rank, group)
            results["bias_balance"] = bias_balance(rank, group)
        if load is not None:  # a full checkpoint written by another number of ranks
            case = CASES_2[0]
            net = expert_parallel(build(case), group=group)
            net.load_state_dict(torch.load(load))
            x_all, _ = batch(case)
            with torch.no_grad():
                results["loaded"] = dict(y=net.eval()(x_all), state=net.state_dict())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, cases: List[Case], out_dir: str, load: Optional[str] = None) -> List[dict]:
    """Run ``_worker`` on ``world`` processes; fail (and kill them) if they are not done in JOIN_TIMEOUT s."""
    return run_ranks(_worker, (world, free_port(), cases, out_dir, load), world, out_dir, JOIN_TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d2, d4 = tmp_path_factory.mktemp("ep2"), tmp_path_factory.mktemp("ep4")
    two = spawn(2, CASES_2, str(d2))
    merged = merge_state_dicts([r[CASES_2[0].name]["shard"] for r in two])
    torch.save(merged, d2 / "merged.pt")
    four = spawn(4, CASES_4, str(d4), load=str(d2 / "merged.pt"))
    return {2: two, 4: four}


# ---------------------------------------------------------------------------------------------- reference
def reference(case: Case) -> dict:
    net = build(case)
    x, probe = batch(case)
    x.requires_grad_()
    y = net(x)
    task = (y * probe).sum()
    if case.aux_scope == "global":
        aux, per_rank = net.moe.aux_loss, None
    else:  # each rank's aux loss on its own tokens; DDP averages their gradients
        per_rank = []
        for r in range(len(case.sizes)):
            net(x[rank_slice(case, r)])
            per_rank.append(net.moe.aux_loss)
        aux = torch.stack(per_rank).mean()
    aux_losses = dict(net.moe.aux_losses)
    (task + aux).backward()
    return dict(y=y.detach(), aux=aux.detach(), per_rank=per_rank, x_grad=x.grad, aux_losses=aux_losses,
                grads={n: p.grad for n, p in net.named_parameters()}, net=net)


def close(a, b, double):
    return torch.allclose(a, b, rtol=1e-9 if double else 1e-4, atol=1e-11 if double else 1e-5)


@pytest.mark.parametrize("world,case", [(2, c) for c in CASES_2] + [(4, c) for c in CASES_4],
                         ids=lambda v: v.name if isinstance(v, Case) else str(v))
def test_matches_single_process(runs, world, case):
    ranks = [r[case.name] for r in runs[world]]
    ref = reference(case)
    per = case.num_experts // world

    assert [r["experts"] for r in ranks] == [list(range(i * per, (i + 1) * per)) for i in range(world)]
    assert [r["y"].shape[0] for r in ranks] == list(case.sizes)
    assert close(torch.cat([r["y"] for r in ranks]), ref["y"], case.double)
    assert close(torch.cat([r["x_grad"] for r in ranks]) / world, ref["x_grad"], case.double)
    for i, r in enumerate(ranks):
        want = ref["aux"] if case.aux_scope == "global" else ref["per_rank"][i].detach()
        assert close(r["aux"], want, case.double), (i, r["aux"], want)
        if case.aux_scope == "global":
            assert r["aux_losses"].keys() == ref["aux_losses"].keys()
            for name, value in r["aux_losses"].items():
                assert close(value, ref["aux_losses"][name].detach(), case.double), name

    seen = set()
    for i, r in enumerate(ranks):
        for name, grad in r["grads"].items():
            assert close(grad, ref["grads"][name], case.double), (i, name)
            if name in r["sharded"]:
                assert name not in seen  # each expert parameter lives on exactly one rank
                seen.add(name)
    assert seen == {n for n in ref["grads"] if ".experts." in n}


@pytest.mark.parametrize("world,case", [(2, CASES_2[1]), (4, CASES_4[0])], ids=["2", "4"])
def test_skewed_ranks_only_send_and_their_idle_experts_get_zero_grads(runs, world, case):
    ranks = [r[case.name] for r in runs[world]]
    half = case.num_experts // 2
    for r in ranks:  # nobody routes to the second half of the experts
        assert all(n == 0 for n in r["counts"][half:case.num_experts])
    tokens = sum(case.sizes) * SEQ
    assert sum(sum(r["counts"][:half]) for r in ranks) > 0
    assert sum(sum(r["counts"]) for r in ranks) == tokens * case.routing["k"]
    for r in ranks[world // 2:]:
        expert_grads = [g for n, g in r["grads"].items() if n in r["sharded"]]
        assert len(expert_grads) == 4 * (case.num_experts // world)  # 2 Linear layers, weight and bias
        assert all(torch.count_nonzero(g) == 0 for g in expert_grads)


def test_rank_without_tokens_returns_an_empty_output(runs):
    empty = runs[2][1]["rank_without_tokens"]
    assert empty["y"].shape == (0, SEQ, OUT) and empty["x_grad"].shape == (0, SEQ, DIM)
    assert sum(empty["counts"]) == 0


def test_checkpoint_saved_by_2_ranks_loads_in_1_process(runs):
    case = CASES_2[0]
    ranks = [r[case.name] for r in runs[2]]
    assert set(ranks[0]["shard"]).isdisjoint(n for n in ranks[1]["shard"] if ".experts." in n)
    merged = merge_state_dicts([r["shard"] for r in ranks])
    full = ranks[0]["full"]
    assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    net = build(case)
    net.load_state_dict(merged)  # strict: every key of the 4-expert model is there
    for e in range(case.num_experts):  # expert e comes from the rank that held it
        owner = ranks[e // 2]["shard"]
        assert torch.equal(net.moe.experts[e][0].weight, owner[f"moe.experts.{e}.0.weight"])
    x, _ = batch(case)
    with torch.no_grad():
        y = net.eval()(x)
    assert torch.allclose(y, torch.cat([r["y_after"] for r in ranks]), rtol=1e-4, atol=1e-5)


def test_checkpoint_saved_by_2_ranks_loads_on_4_ranks(runs):
    case = CASES_2[0]
    merged = merge_state_dicts([r[case.name]["shard"] for r in runs[2]])
    net = build(case)
    net.load_state_dict(merged)
    x, _ = batch(case)
    with torch.no_grad():
        y = net.eval()(x)
    for rank, r in enumerate(runs[4]):
        loaded = r["loaded"]
        assert torch.allclose(loaded["y"], y, rtol=1e-4, atol=1e-5)
        experts = {n.split(".")[2] for n in loaded["state"] if ".experts." in n}
        assert experts == {str(rank)}  # 4 experts on 4 ranks: one each, its own


def test_indivisible_experts_raise_on_every_rank(runs):
    for r in runs[2]:
        assert "num_experts=3 is not divisible by the group size 2" in r["indivisible_error"]


def test_a_missing_peer_fails_with_a_timeout_instead_of_hanging(runs):
    message, seconds = runs[2][0]["hang"]
    assert "Timed out" in message and HANG_TIMEOUT <= seconds < HANG_TIMEOUT + 10


def test_global_balance_all_reduces_counts_over_data_parallel_ranks(runs):
    ranks = [r["dp_global_balance"] for r in runs[2]]
    torch.manual_seed(0)
    block = MLPMixture(DIM, OUT, 4, k=2, aux_criterion="global_switch")
    x_all, _ = batch(Case("dp", 4, (2, 2), double=False))
    block(x_all)  # all 4 samples of both micro-batches of both ranks: the global batch
    for r in ranks:
        assert torch.equal(r["counts"], block.global_balance.counts)
    # the last micro-batch's f is the global batch's: E' Σ f_e p̄_e with p̄ of that rank's micro-batch
    total = block.global_balance.counts.float()
    for rank, r in enumerate(ranks):
        block(x_all[2 + rank:3 + rank])
        want = 4 * ((total / total.sum()) * block.routing.probs.mean(0)).sum()
        assert torch.allclose(r["losses"][1], want.detach())


def test_bias_balance_all_reduces_counts_over_ranks(runs):
    from moefy.routing import update_selection_bias
    torch.manual_seed(0)
    block = MLPMixture(DIM, OUT, 4, k=2, selection_bias=True, bias_update_rate=0.1)
    x_all, _ = batch(Case("dp", 4, (2, 2), double=False))
    block(x_all)  # every micro-batch of every rank in one forward: the same counts, the same update
    want = update_selection_bias(block)[""]
    assert int(want.sum()) == x_all.shape[0] * x_all.shape[1] * 2 and block.router.score_correction_bias.abs().sum() > 0
    for ranks in runs[2]:
        for name in ("dp", "ep"):
            got = ranks["bias_balance"][name]
            assert torch.equal(got["counts"], want), name
            assert torch.equal(got["bias"], block.router.score_correction_bias), name


def test_router_replay_under_expert_parallelism_is_local(runs):
    for r in (ranks["ep_replay"] for ranks in runs[2]):
        assert r["same"] and r["fresh_differs"]
        assert torch.allclose(r["again"], r["y"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- in-process
def test_sharded_experts_index_by_global_id_and_drop_foreign_keys():
    experts = ShardedExperts({2: nn.Linear(3, 2), 3: nn.Linear(3, 2)}, num_experts=4)
    assert len(experts) == 2 and experts[3] is list(experts)[1]
    with pytest.raises(IndexError, match="expert 0 is not on this rank"):
        experts[0]
    full = nn.ModuleList(nn.Linear(3, 2) for _ in range(4)).state_dict()
    experts.load_state_dict(full)  # strict, although experts 0 and 1 are in the file
    assert torch.equal(experts[2].weight, full["2.weight"]) and torch.equal(experts[3].bias, full["3.bias"])
    del full["3.bias"]
    with pytest.raises(RuntimeError, match="3.bias"):
        experts.load_state_dict(full)


def test_merge_state_dicts_refuses_diverged_replicas():
    a, b = {"w": torch.ones(2), "e.0": torch.zeros(1)}, {"w": torch.ones(2), "e.1": torch.ones(1)}
    assert set(merge_state_dicts([a, b])) == {"w", "e.0", "e.1"}
    with pytest.raises(ValueError, match="'w' differs"):
        merge_state_dicts([a, {"w": torch.zeros(2)}])


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    yield
    dist.destroy_process_group()


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(MLPMixture(DIM, OUT, 2))


def test_one_rank_is_the_plain_block_and_bad_input_is_refused(one_rank):
    case = Case("one", 4, (4,), dict(k=2, hole=True, aux_criterion=["cv2", "z"]))
    ref = reference(case)
    net = expert_parallel(build(case))
    x, probe = batch(case)
    y = net(x.requires_grad_())
    ((y * probe).sum() + net.moe.aux_loss).backward()
    assert torch.allclose(y, ref["y"]) and torch.allclose(net.moe.aux_loss, ref["aux"])
    assert all(torch.allclose(p.grad, ref["grads"][n]) for n, p in net.named_parameters())
    assert "expert_parallel(rank=0/1, experts=0..3, aux_scope=global)" in repr(net.moe)
    with pytest.raises(ValueError, match="already expert-parallel"):
        expert_parallel(net)
    with pytest.raises(ValueError, match="token choice only"):
        expert_parallel(MLPMixture(DIM, OUT, 2, expert_choice=True))
    with pytest.raises(ValueError, match="aux_scope must be one of"):
        expert_parallel(MLPMixture(DIM, OUT, 2), aux_scope="mean")
    with pytest.raises(ValueError, match="no MoEBlock"):
        expert_parallel(nn.Linear(2, 2))


def test_seq_balance_needs_local_aux_scope_under_expert_parallelism():
    with pytest.raises(ValueError, match="seq_balance.*aux_scope='local'"):
        expert_parallel(MLPMixture(DIM, OUT, 2, aux_criterion="seq_balance"))  # raised before any collective
