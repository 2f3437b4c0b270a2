"""One non-finite token among 64, per routing mode: does it move the other tokens? (issue 22, item 7)

Usage: ``python benchmarks/nonfinite.py`` (PYTHONPATH=<a checkout> measures that one). Per mode and bad value:
changed: clean tokens whose output differs (torch.equal per row) from the same 63 tokens routed without the
bad one (C is the same for 63 and 64 tokens here); load: sum |counts - counts without it| over real experts;
aux: largest absolute difference of the aux losses from those without it. Then NaN router weights.
"""
import torch
from torch import nn
from moefy import MoEBlock


class Mix(MoEBlock):
    def __init__(self, dim, num_experts, **kw):
        super().__init__(experts=[nn.Linear(dim, dim) for _ in range(num_experts)], input_dim=dim, **kw)

    def expert_forward(self, expert, x):
        return expert(x)


T, D, E, BAD = 64, 8, 8, 5
MODES = {
    "top2": dict(k=2),
    "top2 capacity probs": dict(k=2, token_capacity_factor=1.0, drop_policy="probs"),
    "top2 capacity position": dict(k=2, token_capacity_factor=1.0, drop_policy="position"),
    "expert choice": dict(k=2, expert_choice=True),
    "group-limited sigmoid bias cap": dict(k=2, n_group=4, topk_group=2, score_func="sigmoid", selection_bias=True,
                                           token_capacity_factor=1.0),
    "sigmoid capacity": dict(k=2, score_func="sigmoid", token_capacity_factor=1.0),
    "hole capacity": dict(k=2, hole=True, token_capacity_factor=1.0),
    "null experts capacity": dict(k=2, null_experts={"copy": 1, "zero": 1}, token_capacity_factor=1.0),
}
AUX = ["switch", "z", "entropy", "cv2", "balance", "seq_balance"]
BAD_ROWS = {"nan": [float("nan")] * D, "+inf": [float("inf")] * D, "-inf": [float("-inf")] * D,
            "one +inf": [float("inf")] + [0.0] * (D - 1), "one -inf": [float("-inf")] + [0.0] * (D - 1)}
for value_name, row in BAD_ROWS.items():
    for name, opts in MODES.items():
        torch.manual_seed(0)
        aux = [a for a in AUX if not (a == "seq_balance" and opts.get("expert_choice"))]
        block = Mix(D, E, aux_criterion=aux, **opts).eval()
        if opts.get("selection_bias"):
            block.router.score_correction_bias.copy_(torch.randn(E) * 0.1)
        x = torch.randn(T, D)
        bad = x.clone()
        bad[BAD] = torch.tensor(row)
        clean = torch.cat([x[:BAD], x[BAD + 1:]])
        with torch.no_grad():
            y_bad, r_bad = block(bad), block.routing
            aux_bad = {k: float(v) for k, v in block.aux_losses.items()}
            y_ref, r_ref = block(clean), block.routing
            aux_ref = {k: float(v) for k, v in block.aux_losses.items()}
        y_bad_clean = torch.cat([y_bad[:BAD], y_bad[BAD + 1:]])
        changed = sum(not torch.equal(a, b) for a, b in zip(y_bad_clean, y_ref))
        load = (torch.tensor(r_bad.counts[:E]) - torch.tensor(r_ref.counts[:E])).abs().sum().item()
        diff = max(abs(aux_bad[k] - aux_ref[k]) for k in aux_ref)
        out = y_bad[BAD]
        kind = "NaN" if out.isnan().all() else "zeros" if (out == 0).all() else "finite" if out.isfinite().all() else "mixed"
        print(f"{value_name:8s} {name:31s} changed {changed:2d}/63  load {load:2d}  aux {diff:.1e}  "
              f"bad token's output {kind}")
for opts in (dict(k=2), dict(k=2, expert_choice=True)):
    block = Mix(D, E, **opts).eval()
    with torch.no_grad():
        block.router.gate.weight.fill_(float("nan"))
        block(torch.randn(T, D))
    print(f"NaN router weights, {opts}: counts {block.routing.counts}, dropped {int(block.routing.dropped)}")
