"""FSDP2 (``fully_shard``), DDP, and each with ``expert_parallel`` on 2 gloo processes, against one process.

The model is what a new user builds: a tiny random Llama (``LlamaForCausalLM``) whose MLPs ``moefy()`` turns
into 4 experts (k=2, switch balance loss). Both ranks build it from the same seed; rank r trains on its half
of a fixed batch for STEPS AdamW steps with ``loss = outputs.loss + moefy.aux_loss(model)``; the full weights
are gathered with ``moefy.parallel.full_state_dict`` and compared here with one process trained on the whole
batch from the same initial weights.

Loss normalisation: HF's causal-LM loss is a mean over each rank's tokens (equal counts on both ranks) and
FSDP2 / DDP average the gradients over the ranks, so the task gradient is that of the mean over the global
batch. The switch loss is not linear in the batch (fractions times mean probabilities): with FSDP or DDP alone
each rank's aux loss is its own tokens', so the reference takes the mean of the two halves' aux losses;
under ``expert_parallel`` (``aux_scope="global"``) every rank's aux loss is the whole batch's, and the
reference is one plain forward of the whole batch.

Precision: the model is float64 but for its routers, which moefy() keeps in float32 (as in a bf16 model; that
is why each router is its own FSDP unit, see ``shard``). In float32 the weights after 3 steps differ by up to
8e-5 for no fault of anyone's: AdamW's update ``m / (sqrt(v) + eps)`` turns the rounding of a gradient that
cancels to about eps = 1e-8 into up to lr·ulp/(4·eps) of weight. In float64 that noise is gone: FSDP and DDP,
whose reference splits the batch the same way, must agree to TIGHT (measured: 0 and 1e-16); FSDP + expert
parallelism sums the float32 routers' gradients in another order than one whole-batch backward, so LOOSE
(measured 4e-7). Training moves the weights by 3e-2, and confusing the per-rank and the whole-batch aux loss by
5e-2 (asserted), so both tolerances are far below any real error.
"""
import functools
import os
from datetime import timedelta
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist

import moefy
from gloo_ranks import free_port, run_ranks
from moefy import moefy as make_moe
from moefy.parallel import expert_parallel, full_state_dict, merge_state_dicts, sharded_names, sharded_params

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
BATCH, SEQ, WORLD, STEPS, LR = 4, 8, 2, 3, 1e-2
TIGHT = dict(atol=1e-9, rtol=1e-9)
LOOSE = dict(atol=1e-5, rtol=1e-5)
COLLECTIVE_TIMEOUT, JOIN_TIMEOUT = 60, 180


def build(unused_expert: bool = False, fused: bool = False) -> torch.nn.Module:
    """The moefied tiny Llama, identical on every call, in float64 but for its routers: moefy() makes them in
    float32, as it does in a bf16 model. ``unused_expert``: a selection bias of -1e4 on expert 3 of every
    layer, so no token ever picks it (its parameters get zero gradients). ``fused``: the experts run as one
    pass over their stacked weights, read inside the forward (where FSDP has all-gathered them)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).double()
    make_moe(model, num_experts=4, k=2, target="mlp", aux_criterion={"switch": 0.01}, expert_noise=0.1,
             selection_bias=unused_expert, fused=fused)
    if unused_expert:
        for block in moefy.moe_blocks(model):
            block.router.score_correction_bias[3] = -1e4
    return model


def shard(model, mesh, ignored=None, routers: bool = True) -> None:
    """The recipe: each router, then each decoder layer, then the root. A router is its own FSDP unit
    because FSDP2 wants one parameter dtype per unit and moefy keeps routers in float32."""
    from torch.distributed.fsdp import fully_shard
    for block in moefy.moe_blocks(model) if routers else []:
        fully_shard(block.router, mesh=mesh, ignored_params=ignored)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def batch() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def half(r: int) -> slice:
    return slice(r * BATCH // WORLD, (r + 1) * BATCH // WORLD)


def counts(model) -> List[List[int]]:
    return [list(b.routing.counts[:b.num_experts]) for b in moefy.moe_blocks(model)]


def train(net, model, ids) -> Dict:
    """STEPS AdamW steps on ``ids``; ``net`` is what runs (a DDP wrapper or the model), ``model`` the moefied
    model (for the aux losses)."""
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    losses, aux_losses, seen = [], [], []
    for _ in range(STEPS):
        task = net(input_ids=ids, labels=ids).loss
        aux = moefy.aux_loss(model)
        (task + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append((task + aux).item())
        aux_losses.append(aux.item())
        seen.append(counts(model))
    return dict(losses=losses, aux=aux_losses, counts=seen)


# ------------------------------------------------------------------------------------------------ the ranks
def fsdp(rank: int, mesh) -> Dict:
    """fully_shard per router, per decoder layer, then the root; fused experts."""
    model = build(fused=True)
    shard(model, mesh)
    out = train(model, model, batch()[half(rank)])
    try:  # a rank's state dict holds DTensors (pieces of parameters): merging them would be wrong
        merge_state_dicts([model.state_dict()])
    except TypeError as err:
        out["merge_error"] = str(err)
    out["full"] = full_state_dict(model)
    out["dtensors"] = sum(type(v).__name__ == "DTensor" for v in model.state_dict().values())
    out["fused"] = [b._fused is not None for b in moefy.moe_blocks(model)]
    return out


def fsdp_expert_parallel(rank: int, mesh, group) -> Dict:
    """Experts sharded by expert_parallel, everything else by fully_shard, which ignores the experts."""
    model = build()
    expert_parallel(model, group=group)
    shard(model, mesh, ignored=sharded_params(model))
    out = train(model, model, batch()[half(rank)])
    out["full"] = full_state_dict(model)
    out["sharded"] = sorted(sharded_names(model))
    return out


def fsdp_expert_parallel_mistakes(rank: int, mesh, group) -> Dict:
    """What goes wrong without the recipe: routers inside the layers' units, FSDP sharding the experts too,
    expert_parallel after fully_shard."""
    from torch.distributed.fsdp import fully_shard
    out = {}
    model = build()
    shard(model, mesh, routers=False)
    try:  # float32 routers in float64 layers: FSDP2 refuses at its lazy init, before any collective
        model(input_ids=batch()[half(rank)])
    except AssertionError as err:
        out["routers_in_layers"] = str(err)
    model = build()
    expert_parallel(model, group=group)
    shard(model, mesh)  # no ignored_params
    try:
        model(input_ids=batch()[half(rank)])
    except RuntimeError as err:
        out["forgot_ignored"] = str(err)
    model = build()
    fully_shard(model, mesh=mesh)
    try:
        expert_parallel(model, group=group)
    except ValueError as err:
        out["after_fully_shard"] = str(err)
    return out


def ddp(rank: int) -> Dict:
    """Plain DDP, no find_unused_parameters, with expert 3 never picked (zero gradients, not None)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build(unused_expert=True)
    out = train(DDP(model), model, batch()[half(rank)])
    out["full"] = full_state_dict(model)
    return out


def ddp_expert_parallel(rank: int, group) -> Dict:
    """DDP on an expert-parallel model, without telling DDP to ignore the experts: expert_parallel did."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build()
    expert_parallel(model, group=group)
    out = train(DDP(model), model, batch()[half(rank)])
    out["full"] = full_state_dict(model)
    return out


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,))
        group = dist.new_group()  # the experts' all-to-alls on their own group
        results = dict(fsdp=fsdp(rank, mesh), fsdp_ep=fsdp_expert_parallel(rank, mesh, group), ddp=ddp(rank),
                       ddp_ep=ddp_expert_parallel(rank, group),
                       mistakes=fsdp_expert_parallel_mistakes(rank, mesh, group))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> List[Dict]:
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    return run_ranks(_worker, (free_port(), out_dir), WORLD, out_dir, JOIN_TIMEOUT)


# ------------------------------------------------------------------------------------------- the reference
@functools.lru_cache(maxsize=None)
def reference(aux_scope: str, unused_expert: bool = False, fused: bool = False) -> Dict:
    """One process, the whole batch, the same STEPS AdamW steps. ``aux_scope="local"``: the aux loss is the
    mean of the two halves' (what each FSDP / DDP rank computes), taken as two accumulated micro-batches whose
    task losses average to the whole batch's mean; ``"global"``: one forward of the whole batch."""
    model = build(unused_expert, fused)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, losses, aux_losses = batch(), [], []
    for _ in range(STEPS):
        if aux_scope == "global":
            task = model(input_ids=ids, labels=ids).loss
            aux = moefy.aux_loss(model)
            (task + aux).backward()
            aux_losses.append(aux.item())
        else:
            task = aux = 0.0
            for r in range(WORLD):
                task_r = model(input_ids=ids[half(r)], labels=ids[half(r)]).loss / WORLD
                aux_r = moefy.aux_loss(model) / WORLD
                (task_r + aux_r).backward()
                task, aux = task + task_r.detach(), aux + aux_r.detach()
        opt.step()
        opt.zero_grad()
        losses.append((task + aux).item())
    return dict(state=model.state_dict(), initial=initial, losses=losses, aux=aux_losses)


def max_difference(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def check_same_training(ranks: List[Dict], scenario: str, ref: Dict, tolerance: Dict) -> float:
    """Every rank's gathered weights are the reference's; the mean of the ranks' losses is its loss."""
    for r in ranks:
        for key, want in ref["state"].items():
            torch.testing.assert_close(r[scenario]["full"][key], want, **tolerance, msg=key)
    mean_losses = [sum(r[scenario]["losses"][s] for r in ranks) / WORLD for s in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref["losses"]), atol=1e-6, rtol=1e-6)
    assert max_difference(ref["state"], ref["initial"]) > 1e-2  # the weights trained
    return max_difference(ranks[0][scenario]["full"], ref["state"])


def test_fully_shard_per_layer_trains_like_one_process(ranks):
    difference = check_same_training(ranks, "fsdp", reference("local", fused=True), TIGHT)
    print(f"fsdp: max |w - w_ref| = {difference:.2e}")
    assert all(r["fsdp"]["dtensors"] > 0 for r in ranks)  # the parameters really were sharded
    assert all(r["fsdp"]["fused"] == [True, True] for r in ranks)
    full = ranks[0]["fsdp"]["full"]
    assert all(torch.equal(full[k], ranks[1]["fsdp"]["full"][k]) for k in full)
    # the aux losses are per rank: the reference with the whole batch's aux loss trains to other weights
    assert max_difference(reference("global")["state"], reference("local", fused=True)["state"]) > 1e-2


def test_fully_shard_with_expert_parallel_trains_like_one_process(ranks):
    ref = reference("global")
    difference = check_same_training(ranks, "fsdp_ep", ref, LOOSE)
    print(f"fsdp + expert_parallel: max |w - w_ref| = {difference:.2e}")
    sharded = [r["fsdp_ep"]["sharded"] for r in ranks]
    assert {n.split(".experts.")[1].split(".")[0] for n in sharded[0]} == {"0", "1"}
    assert {n.split(".experts.")[1].split(".")[0] for n in sharded[1]} == {"2", "3"}
    for r in ranks:  # aux_scope="global": every rank's aux loss is the whole batch's
        torch.testing.assert_close(torch.tensor(r["fsdp_ep"]["aux"]), torch.tensor(ref["aux"]), atol=1e-6, rtol=1e-6)


def test_ddp_needs_no_find_unused_parameters(ranks):
    difference = check_same_training(ranks, "ddp", reference("local", unused_expert=True), TIGHT)
    print(f"ddp: max |w - w_ref| = {difference:.2e}")
    for r in ranks:  # expert 3 got no token, so DDP saw its (zero) gradients without find_unused_parameters
        assert all(c[3] == 0 for step in r["ddp"]["counts"] for c in step)


def test_ddp_leaves_the_expert_parallel_experts_alone_untold(ranks):
    difference = check_same_training(ranks, "ddp_ep", reference("global"), LOOSE)
    print(f"ddp + expert_parallel: max |w - w_ref| = {difference:.2e}")


def test_what_goes_wrong_without_the_recipe_is_refused(ranks):
    for r in ranks:
        assert "uniform original parameter dtype" in r["mistakes"]["routers_in_layers"]
        assert "were sharded by FSDP" in r["mistakes"]["forgot_ignored"]
        assert "ignored_params=sharded_params(model)" in r["mistakes"]["forgot_ignored"]
        assert "call expert_parallel first" in r["mistakes"]["after_fully_shard"]
        assert "is a DTensor" in r["fsdp"]["merge_error"]
