"""Bad-input sweep: every public function and constructor, called with wrong types, shapes, ranges and names.

Each case must raise the listed exception (ValueError / TypeError, or a documented specific one such as
LogFormatError or FileNotFoundError) from moefy's own code, with a message naming the argument, within a
few seconds: never an AttributeError / IndexError / RuntimeError from deep inside torch, numpy or the
standard library, never a hang. ``test_every_public_name_is_swept`` keeps the table complete.
"""
import json
import signal
import struct
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moefy
import moefy.hf
import moefy.viz
from moefy import compress
from conftest import LinearMixture
from moefy import compat, convert, data
from moefy.convert import hf as upcycle_hf
from moefy.convert import routes, sources
from moefy.observe import log as moelog
from moefy.observe import recorder as stats
from moefy.observe.log import LogFormatError
from moefy.recipes import distill, metrics, reliability
from moefy.recipes.sparse_moe import MoE
from moefy.routing import bias_balance, losses, noise, replay
from moefy.config import RoutingConfig
from moefy.convert import drop_upcycling, ffn_parts, granular
from moefy.convert import save as save_mod
from moefy.routing.router import Router
from moefy.viz import patches

CASES = []


def case(target, call, error, match, xfail=None):
    """``call(tmp)`` must raise ``error`` whose message matches ``match``; ``target`` names the public API."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    CASES.append(pytest.param(target, call, error, match, marks=marks, id=f"{target}-{len(CASES)}"))


# ------------------------------------------------------------------------------------------- helpers
def lin(**kw):
    return LinearMixture(4, 2, 3, **kw)


def ran(**kw):
    block = lin(**kw)
    block(torch.randn(1, 4, 4))  # 4 tokens = a 2x2 patch grid
    return block


def probs_targets(n=6, c=3):
    return torch.softmax(torch.randn(n, c), -1), torch.arange(n) % c


def mha():
    return convert.AttentionMixture(nn.MultiheadAttention(8, 2, batch_first=True), num_experts=2)


class BertLayer(nn.Module):
    """The shape of a BERT encoder layer's FFN: ``.intermediate`` then ``.output.dense``."""

    def __init__(self):
        super().__init__()
        self.intermediate = nn.Sequential(nn.Linear(4, 8), nn.GELU())
        self.output = nn.Module()
        self.output.dense = nn.Linear(8, 4)


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))


class Offset(nn.Module):
    """An FFN-looking module whose forward uses more than its layers: it cannot be cut into slices."""

    def __init__(self, scale=False):
        super().__init__()
        self.fc1, self.fc2, self.scale = nn.Linear(4, 6), nn.Linear(6, 4), scale
        self.offset = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return 2 * self.fc2(self.fc1(x)) if self.scale else self.fc2(self.fc1(x) + self.offset)


def log_file(tmp, lines=None):
    path = Path(tmp) / "log.jsonl"
    lines = lines or [{"epoch": 1, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.5, 0.5]}]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines), encoding="utf-8")
    return path


def a_log(tmp):
    return moelog.read_log(log_file(tmp))


def summary():
    block = ran()
    rec = stats.RoutingRecorder(block)
    rec.record("", block)
    return rec.summary()


def recorder_forward(labels):
    block = lin()
    with stats.RoutingRecorder(block) as rec:
        rec.labels = labels
        block(torch.randn(2, 3, 4))


def patch_routing():
    return patches.PatchRouting(name="m", title="t", image=np.zeros((4, 4, 3)), patch_size=(2, 2),
                                masks=np.ones((3, 2, 2), bool), panel_names=["a", "b", "c"], prefix_tokens=0,
                                prefix_routed=[0, 0, 0], whole_image=False)


class Plain(moefy.MoEBlock):
    def expert_forward(self, expert, x):
        return expert(x)


def patch_model():
    """(1, C, 4, 4) images → 4 tokens of 4 features (2x2 patches of one channel) → a mixture."""
    from einops.layers.torch import Rearrange
    return nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2), lin())


def idx_file(tmp, payload: bytes):
    path = Path(tmp) / "x-idx1-ubyte"
    path.write_bytes(payload)
    return path


def dataset():
    x = torch.zeros(4, 1, 2, 2)
    y = torch.arange(4)
    return data.ImageDataset(x, y, x, y, classes=("a", "b", "c", "d"), name="tiny")


def dense_checkpoint(**shape):
    mix = convert.moefy(nn.Linear(4, 4), num_experts=2)
    return mix, nn.Linear(shape.get("i", 4), shape.get("o", 4)).state_dict()


IMG = np.zeros((4, 4), dtype=np.float32)
BLOCK_PY = "moefy/block.py is not mine to edit"
ROUTING_PY = "moefy/routing/ is not mine to edit"

# ------------------------------------------------------------------------------ MoEBlock (block.py)
case("MoEBlock", lambda t: lin(k=0), ValueError, r"\bk must be")
case("MoEBlock", lambda t: lin(k="2"), ValueError, r"\bk must be")
case("MoEBlock", lambda t: lin(k=float("nan")), ValueError, r"\bk must be")
case("MoEBlock", lambda t: lin(expert_choice=True, k=float("inf")), ValueError, r"\bk must be")
case("MoEBlock", lambda t: lin(noise=3), ValueError, r"noise must be one of")
case("MoEBlock", lambda t: lin(noise=["gumbel"]), ValueError, r"noise must be one of")
case("MoEBlock", lambda t: lin(aux_criterion="Switch"), ValueError, r"aux_criterion: unknown loss")
case("MoEBlock", lambda t: lin(aux_criterion={"switch": "1"}), ValueError, r"aux_criterion: coefficient")
case("MoEBlock", lambda t: lin(aggregation=None), ValueError, r"aggregation must be one of")
case("MoEBlock", lambda t: lin(route=1), ValueError, r"route must be one of")
case("MoEBlock", lambda t: lin(score_func=None), ValueError, r"score_func must be one of")
case("MoEBlock", lambda t: lin(temperature="1"), ValueError, r"temperature must be")
case("MoEBlock", lambda t: lin(temperature=float("nan")), ValueError, r"temperature must be")
case("MoEBlock", lambda t: lin(capacity_factor="2"), ValueError, r"capacity_factor must be")
case("MoEBlock", lambda t: lin(capacity=-3), ValueError, r"capacity must be")
case("MoEBlock", lambda t: lin(fused="yes"), TypeError, r"fused must be")
case("MoEBlock", lambda t: lin(token_capacity_factor=-1), ValueError, r"token_capacity_factor must be")
case("MoEBlock", lambda t: lin(token_capacity_factor="1"), ValueError, r"token_capacity_factor must be")
case("MoEBlock", lambda t: lin(expert_choice=True, token_capacity_factor=1.0), ValueError,
     r"token_capacity_factor caps token choice")
case("MoEBlock", lambda t: lin(token_capacity_factor=1.0, drop_policy="score"), ValueError,
     r"drop_policy must be one of")
case("MoEBlock", lambda t: lin(num_expert=3), TypeError, r"unknown option\(s\) \['num_expert'\]")
case("MoEBlock", lambda t: LinearMixture(0, 2, 3), ValueError, r"input_dim must be")
case("MoEBlock", lambda t: LinearMixture(4, 2, 0), TypeError, r"experts must be a non-empty list")
case("MoEBlock", lambda t: Plain(experts="abc", input_dim=4), TypeError,
     r"experts must be")
case("MoEBlock", lambda t: lin()(torch.randn(2, 5)), ValueError, r"x must have shape \(\.\.\., input_dim=4\)")
case("MoEBlock", lambda t: lin()(torch.zeros(2, 4, dtype=torch.complex64)), TypeError, r"x must be a floating")
case("MoEBlock", lambda t: lin()(np.zeros((2, 4))), TypeError, r"x must be a torch.Tensor")
case("MoEBlock", lambda t: lin(route="samples")(torch.randn(4)), ValueError, r"x must have shape \(B, \.\.\.\)")
case("MoEBlock", lambda t: lin().experts_load(), RuntimeError, r"has not run a forward yet")
case("MoEBlock", lambda t: lin()(torch.randn(2, 5, 4), token_mask=torch.ones(2, 5)), TypeError,
     r"token_mask must be a bool tensor")
case("MoEBlock", lambda t: lin()(torch.randn(2, 5, 4), token_mask=[True] * 10), TypeError,
     r"token_mask must be a bool tensor")
case("MoEBlock", lambda t: lin()(torch.randn(2, 5, 4), token_mask=torch.ones(10, dtype=torch.bool)), ValueError,
     r"token_mask must have the tokens' shape \(2, 5\)")
case("MoEBlock", lambda t: Plain(experts=None, input_dim=4), TypeError,
     r"experts must be")
case("MoEBlock", lambda t: lin(aux_criterion=3), ValueError, r"aux_criterion")
case("MoEBlock", lambda t: lin(aux_criterion={"switch": float("nan")}), ValueError, r"aux_criterion: coefficient")
case("MoEBlock", lambda t: lin(hole="no"), TypeError, r"hole must be")
case("MoEBlock", lambda t: lin(expert_choice=True, capacity_factor=float("nan"))(torch.randn(3, 4)), ValueError,
     r"capacity_factor must be")
case("MoEBlock", lambda t: lin(expert_choice=True, capacity=True), ValueError, r"capacity must be")
case("MoEBlock", lambda t: lin(route="samples", feature_dim=5)(torch.randn(2, 4)), ValueError, r"feature_dim")
case("MoEBlock", lambda t: lin().route_rows(torch.randn(3, 5)), ValueError, r"x must have shape")

# ------------------------------------------------------------------------- RoutingConfig (config.py)
case("RoutingConfig", lambda t: RoutingConfig(k=0), ValueError, r"^k must be a number in \[1, E\]")
case("RoutingConfig", lambda t: RoutingConfig(k="2"), ValueError, r"\bk must be a number")
case("RoutingConfig", lambda t: RoutingConfig(k=True), ValueError, r"\bk must be a number")
case("RoutingConfig", lambda t: RoutingConfig(k=1.5), ValueError, r"k must be an int for token choice, got 1\.5")
case("RoutingConfig", lambda t: RoutingConfig(expert_choice=True, k=float("inf")), ValueError, r"\bk must be")
case("RoutingConfig", lambda t: RoutingConfig(route="pixels"), ValueError, r"route must be one of")
case("RoutingConfig", lambda t: RoutingConfig(token_capacity_factor=0), ValueError, r"token_capacity_factor must be")
case("RoutingConfig", lambda t: RoutingConfig(drop_policy=None), ValueError, r"drop_policy must be one of")
case("RoutingConfig", lambda t: RoutingConfig(route="Images"), ValueError, r"route must be one of")
case("RoutingConfig", lambda t: RoutingConfig(route=None), ValueError, r"route must be one of")
case("RoutingConfig", lambda t: RoutingConfig(route=["samples"]), ValueError, r"route must be one of")
case("RoutingConfig", lambda t: RoutingConfig(noise="Gumbel"), ValueError, r"noise must be one of")
case("RoutingConfig", lambda t: RoutingConfig(aux_criterion="Switch"), ValueError, r"aux_criterion: unknown loss")
case("RoutingConfig", lambda t: RoutingConfig(hole=1), TypeError, r"hole must be")
case("RoutingConfig", lambda t: RoutingConfig(layer_id=-1), ValueError, r"layer_id must be")
case("RoutingConfig", lambda t: RoutingConfig(feature_dim="1"), TypeError, r"feature_dim must be")
case("RoutingConfig.from_options", lambda t: RoutingConfig.from_options(nosie="gumbel"), TypeError,
     r"RoutingConfig got unknown option\(s\) \['nosie'\]; allowed: \['k', ")
case("RoutingConfig.from_options", lambda t: RoutingConfig.from_options(RoutingConfig(), num_experts=4), TypeError,
     r"unknown option\(s\) \['num_experts'\]")
case("RoutingConfig.from_options", lambda t: RoutingConfig.from_options({"k": 2}), TypeError,
     r"config must be a RoutingConfig or None, got dict")
case("RoutingConfig.from_options", lambda t: RoutingConfig.from_options(RoutingConfig(), route="pixels"), ValueError,
     r"route must be one of")
case("RoutingConfig.from_options", lambda t: RoutingConfig.from_options(k=0), ValueError, r"\bk must be")
case("RoutingConfig.check_columns", lambda t: RoutingConfig(k=3).check_columns(2), ValueError,
     r"k must be a number in \[1, 2\] \(the number of experts\), got 3")
case("RoutingConfig.check_columns", lambda t: RoutingConfig(k=4, hole=True).check_columns(2), ValueError,
     r"k must be a number in \[1, 3\] \(the number of experts \+ hole\)")
case("RoutingConfig.check_columns", lambda t: RoutingConfig().check_columns(0), ValueError, r"num_experts must be")
case("RoutingConfig.check_columns", lambda t: RoutingConfig().check_columns("3"), ValueError,
     r"num_experts must be")

# ----------------------------------------------------------------------- Router (routing/router.py)
case("Router", lambda t: Router(4, 3, noise="normal"), ValueError, r"noise must be one of")
case("Router", lambda t: Router(4, 3, score_func="tanh"), ValueError, r"score_func must be one of")
case("Router", lambda t: Router(4, 3, temperature=0), ValueError, r"temperature must be")
case("Router", lambda t: Router("4", 3), ValueError, r"input_dim must be")
case("Router", lambda t: Router(4, 0), ValueError, r"num_columns must be")
case("Router", lambda t: Router(4, 3, temperature=float("inf")), ValueError, r"temperature must be")
case("Router", lambda t: Router(4, 3, jitter_eps=-1.0), ValueError, r"jitter_eps must be")
case("Router", lambda t: Router(4, 3)(torch.randn(2, 5)), ValueError, r"x must have shape")

# --------------------------------------------------------------------- aux_loss, moe_blocks (block.py)
case("aux_loss", lambda t: moefy.aux_loss("model"), TypeError, r"model must be")
case("moe_blocks", lambda t: moefy.moe_blocks(None), TypeError, r"model must be")

# -------------------------------------------------------------------------------- routing/losses.py
case("cv_squared", lambda t: losses.cv_squared([1.0, 2.0]), TypeError, r"v must be a (torch\.)?[Tt]ensor")
case("cv_squared", lambda t: losses.cv_squared(torch.ones(3), eps=-1.0), ValueError, r"eps must be")
for _name in losses.AUX_LOSSES:
    case(f"AUX_LOSSES.{losses.AUX_LOSSES[_name].__name__}", lambda t, n=_name: losses.AUX_LOSSES[n]("routing"), TypeError,
         r"r must be a Routing")
case("importance", lambda t: losses.importance(None), TypeError, r"r must be a Routing")
case("smooth_load", lambda t: losses.smooth_load(torch.ones(3)), TypeError, r"r must be a Routing")
case("seq_balance_loss", lambda t: losses.seq_balance_loss(ran(expert_choice=True, k=1.0).routing), ValueError,
     r"seq_balance needs a token_choice")
case("global_switch_loss", lambda t: losses.global_switch_loss(ran().routing, torch.ones(7)), ValueError,
     r"counts must be a tensor of shape \(E'=3,\)")
case("global_switch_loss", lambda t: losses.global_switch_loss(ran().routing, [1, 2, 3]), ValueError,
     r"counts must be a tensor")
case("GlobalBalance", lambda t: losses.GlobalBalance(0), ValueError, r"num_columns must be")
case("GlobalBalance", lambda t: losses.GlobalBalance(3.0), ValueError, r"num_columns must be")
case("GlobalBalance", lambda t: losses.GlobalBalance(3, group=0), TypeError, r"group must be")
case("GlobalBalance", lambda t: losses.GlobalBalance(3)("routing"), TypeError, r"r must be a Routing")
case("GlobalBalance", lambda t: losses.GlobalBalance(4)(ran().routing), ValueError, r"routing r has 3")
case("reset_global_balance", lambda t: losses.reset_global_balance("model"), TypeError, r"model must be")

# -------------------------------------------------------------------------------- routing/bias_balance.py
case("bias_update", lambda t: bias_balance.bias_update([0.0, 0.0], torch.ones(2), 0.1), TypeError,
     r"bias must be a floating-point torch.Tensor")
case("bias_update", lambda t: bias_balance.bias_update(torch.zeros(2), [1, 2], 0.1), TypeError,
     r"counts must be a torch.Tensor")
case("bias_update", lambda t: bias_balance.bias_update(torch.zeros(2), torch.ones(3), 0.1), ValueError,
     r"bias and counts must both have shape \(E,\)")
case("bias_update", lambda t: bias_balance.bias_update(torch.zeros(2), torch.ones(2), 0), ValueError,
     r"rate must be a finite number > 0, got 0")
case("BiasBalance", lambda t: bias_balance.BiasBalance(0, 0.1), ValueError, r"num_experts must be")
case("BiasBalance", lambda t: bias_balance.BiasBalance(3, -1), ValueError, r"rate must be")
case("BiasBalance", lambda t: bias_balance.BiasBalance(3, 0.1).add("routing"), TypeError, r"r must be a Routing")
case("BiasBalance", lambda t: bias_balance.BiasBalance(4, 0.1).add(ran().routing), ValueError,
     r"the routing r has 3")
case("update_selection_bias", lambda t: bias_balance.update_selection_bias("model"), TypeError,
     r"model must be an nn.Module")
case("update_selection_bias", lambda t: bias_balance.update_selection_bias(lin(), group=0), TypeError,
     r"group must be")
case("RoutingConfig", lambda t: RoutingConfig(bias_update_rate=0.1), ValueError,
     r"bias_update_rate=0.1 .* needs selection_bias=True")
case("RoutingConfig", lambda t: RoutingConfig(selection_bias=True, bias_update_rate="0.1"), ValueError,
     r"bias_update_rate must be a number >= 0")

# -------------------------------------------------------------------------------- routing/replay.py
case("RouterReplay", lambda t: replay.RouterReplay(None), TypeError, r"model must be an nn.Module")
case("RouterReplay", lambda t: replay.RouterReplay(nn.Linear(2, 2)), ValueError, r"no MoEBlock")
case("RouterReplay", lambda t: replay.RouterReplay(lin(expert_choice=True, k=1.0)), ValueError,
     r"token choice only")
case("RouterReplay.replay", lambda t: replay.RouterReplay(lin()).replay(weights="fixed").__enter__(), ValueError,
     r"weights must be one of")
case("replay_selection", lambda t: replay.replay_selection(torch.rand(5, 3), replay.Replayed(
    torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)), RoutingConfig(), 3), ValueError, r"indices .*T=5")
case("replay_selection", lambda t: replay.replay_selection(torch.rand(4, 3), replay.Replayed(
    torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)), RoutingConfig(), 3), ValueError, r"k=2 .*k=1")

# --------------------------------------------------------------------------------- routing/noise.py
case("validate_noise", lambda t: noise.validate_noise("Gumbel"), ValueError, r"noise must be one of")
case("gumbel_like", lambda t: noise.gumbel_like([0.0]), TypeError, r"t must be a")
case("gumbel_like", lambda t: noise.gumbel_like(torch.zeros(3, dtype=torch.long)), TypeError, r"t must be a")
case("GaussianNoiseStd", lambda t: noise.GaussianNoiseStd("4", 3), ValueError, r"input_dim must be")
case("GaussianNoiseStd", lambda t: noise.GaussianNoiseStd(4, 0), ValueError, r"num_columns must be")
case("GaussianNoiseStd", lambda t: noise.GaussianNoiseStd(4, 3, min_std=0.0), ValueError, r"min_std must be")

# ----------------------------------------------------------------------- moefy, mixtures (convert/)
case("moefy", lambda t: moefy.moefy("linear"), TypeError, r"module must be an nn.Module")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), num_experts=0), ValueError, r"num_experts must be")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), num_experts="4"), ValueError, r"num_experts must be")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), num_experts=2, k=3), ValueError, r"\bk must be")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), expert_noise=-0.1), ValueError, r"expert_noise must be")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), expert_noise=float("nan")), ValueError, r"expert_noise")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), expert_noise=True), ValueError, r"expert_noise must be")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), route="pixels"), ValueError, r"route must be one of")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), input_dim="4"), ValueError, r"input_dim must be")
case("moefy", lambda t: moefy.moefy(nn.ReLU()), ValueError, r"input_dim: cannot infer")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), noise="Gaussian"), ValueError, r"noise must be one of")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), nosie="gumbel"), TypeError, r"unknown option\(s\) \['nosie'\]")
# -------------------------------------------- shared experts and DeepSeek-V3 routing (config, block, router)
case("RoutingConfig", lambda t: RoutingConfig(n_group=0), ValueError, r"n_group must be a positive int, got 0")
case("RoutingConfig", lambda t: RoutingConfig(n_group=2.0), ValueError, r"n_group must be")
case("RoutingConfig", lambda t: RoutingConfig(n_group=2, topk_group=3), ValueError,
     r"topk_group must be an int in \[1, n_group=2\] or None, got 3")
case("RoutingConfig", lambda t: RoutingConfig(topk_group=0), ValueError, r"topk_group must be")
case("RoutingConfig", lambda t: RoutingConfig(routed_scaling_factor=0), ValueError, r"routed_scaling_factor must be")
case("RoutingConfig", lambda t: RoutingConfig(routed_scaling_factor="2"), ValueError, r"routed_scaling_factor")
case("RoutingConfig", lambda t: RoutingConfig(selection_bias=1), TypeError, r"selection_bias must be True or False")
case("RoutingConfig", lambda t: RoutingConfig(shared_gate="yes"), TypeError, r"shared_gate must be True or False")
case("RoutingConfig", lambda t: RoutingConfig(n_group=2, hole=True), ValueError, r"n_group=2: .* hole=False")
case("RoutingConfig", lambda t: RoutingConfig(n_group=2, expert_choice=True), ValueError,
     r"n_group=2: .* expert_choice=False")
case("RoutingConfig", lambda t: RoutingConfig(n_group=2, noise="simple"), ValueError, r"n_group=2: .*'simple'")
case("RoutingConfig", lambda t: RoutingConfig(null_experts="zero"), TypeError, r"null_experts must be None or a mapping")
case("RoutingConfig", lambda t: RoutingConfig(null_experts={"Zero": 1}), ValueError, r"null_experts: unknown kind")
case("RoutingConfig", lambda t: RoutingConfig(null_experts={"copy": -1}), ValueError,
     r"null_experts\['copy'\] must be an int >= 0")
case("RoutingConfig", lambda t: RoutingConfig(null_experts={"zero": None}), ValueError, r"null_experts\['zero'\]")
case("RoutingConfig", lambda t: RoutingConfig(null_experts={"zero": 1}, expert_choice=True), ValueError,
     r"null_experts .*\(expert_choice=False\)")
case("RoutingConfig", lambda t: RoutingConfig(null_experts={"constant": 1}, route="samples"), ValueError,
     r"null_experts 'constant' .*route='tokens'")
case("MoEBlock", lambda t: lin(null_experts={"copy": 1})(torch.randn(3, 4)), ValueError,
     r"null_experts 'copy' / 'constant' .* input's shape \(4,\)")
case("MoEBlock", lambda t: lin(k=5, null_experts={"zero": 1}), ValueError,
     r"k must be a number in \[1, 4\] \(the number of experts \+ null experts\)")
case("RoutingConfig", lambda t: RoutingConfig(selection_bias=True, noise="simple"), ValueError,
     r"selection_bias .* noise other than 'simple'")
case("RoutingConfig", lambda t: RoutingConfig(selection_bias=True, expert_choice=True), ValueError,
     r"selection_bias .*\(expert_choice=False")
case("RoutingConfig.check_columns", lambda t: RoutingConfig(n_group=4).check_columns(6), ValueError,
     r"n_group=4 must divide the number of experts, got 6")
case("RoutingConfig.check_columns", lambda t: RoutingConfig(k=3, n_group=3, topk_group=1).check_columns(6),
     ValueError, r"k=3 must fit in the kept groups: k <= topk_group \* E / n_group = 1 \* 6 / 3")
case("MoEBlock", lambda t: lin(n_group=2), ValueError, r"n_group=2 must divide the number of experts, got 3")
case("MoEBlock", lambda t: lin(shared_gate=True), ValueError, r"shared_gate=True .* pass shared_experts")
case("MoEBlock", lambda t: lin(shared_experts=nn.Linear(4, 2)), TypeError,
     r"shared_experts must be None or a list of nn.Module, got Linear")
case("MoEBlock", lambda t: lin(shared_experts=["linear"]), TypeError, r"shared_experts must be None or a list")
case("MoEBlock", lambda t: lin(shared_experts=3), TypeError, r"shared_experts must be None or a list of nn.Module")
case("Router", lambda t: Router(4, 3, selection_bias="yes"), TypeError, r"selection_bias must be True or False")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), num_shared=-1), ValueError, r"num_shared must be an int >= 0")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), num_shared="1"), ValueError, r"num_shared must be")
case("merge", lambda t: convert.merge(moefy.moefy(nn.Linear(4, 4), num_shared=1)), ValueError,
     r"mixture has shared experts")
case("moefy", lambda t: moefy.moefy(moefy.moefy(nn.Linear(4, 4))), TypeError, r"module is already a mixture")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4))(torch.randn(3, 5)), ValueError, r"x must have shape")
case("moefy", lambda t: moefy.moefy(nn.Conv2d(3, 4, 3))(torch.randn(3, 8, 8)), ValueError, r"x must be batched")
case("moefy", lambda t: moefy.moefy(nn.Conv2d(3, 4, 3))(torch.randn(2, 5, 8, 8)), ValueError,
     r"x must have shape \(B, \.\.\.\) with input_dim=3 features on dim 1")
case("moefy", lambda t: moefy.moefy(nn.GRU(4, 4)), ValueError, r"route='samples' needs the batch on dim 0")
case("moefy", lambda t: moefy.moefy("model", target="0"), TypeError, r"module must be an nn.Module")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target=3), TypeError, r"target must be")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target=[]), TypeError, r"target must be")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target=[1, 2]), TypeError, r"target must be")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target=(nn.Linear, int)), TypeError,
     r"target: module types")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target="fc"), ValueError,
     r"target 'fc' matched no submodule")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target="0", num_experts=0), ValueError,
     r"moefy target '0': num_experts must be")
case("moefy", lambda t: moefy.moefy(nn.Sequential(nn.Linear(4, 4)), target="0", k=0), ValueError,
     r"moefy target '0': k must be")
case("ModuleMixture", lambda t: convert.ModuleMixture(nn.Linear(4, 4), num_experts=True), ValueError,
     r"num_experts must be")
case("ModuleMixture", lambda t: convert.ModuleMixture(lambda x: x), TypeError, r"module must be an nn.Module")
# granular upcycling / drop-upcycling (convert/granular.py, convert/drop_upcycling.py, convert/ffn_parts.py)
case("moefy", lambda t: moefy.moefy(mlp(), granularity=0), ValueError, r"granularity must be a positive int")
case("moefy", lambda t: moefy.moefy(mlp(), granularity="2"), ValueError, r"granularity must be")
case("moefy", lambda t: moefy.moefy(mlp(), granularity=True), ValueError, r"granularity must be")
case("moefy", lambda t: moefy.moefy(mlp(), granularity=2.0), ValueError, r"granularity must be")
case("moefy", lambda t: moefy.moefy(mlp(), granularity=2, split="kmeans"), ValueError, r"split must be one of")
case("moefy", lambda t: moefy.moefy(mlp(), split=None), ValueError, r"split must be one of")
case("moefy", lambda t: moefy.moefy(mlp(), granularity=4), ValueError, r"granularity=4 must divide .* H=6")
case("moefy", lambda t: moefy.moefy(mlp(), num_experts=3, granularity=2), ValueError,
     r"num_experts must be a multiple of granularity=2")
case("moefy", lambda t: moefy.moefy(nn.Linear(4, 4), granularity=2), ValueError,
     r"granularity: Linear is not an FFN")
case("moefy", lambda t: moefy.moefy(nn.Conv2d(3, 4, 3), drop_fraction=0.5), ValueError,
     r"drop_fraction: Conv2d is not an FFN")
case("moefy", lambda t: moefy.moefy(Offset(), granularity=2), ValueError,
     r"granularity: Offset does not run with its hidden layers cut")
case("moefy", lambda t: moefy.moefy(Offset(scale=True), granularity=2), ValueError,
     r"granularity: the 2 slices of Offset do not add up")
case("moefy", lambda t: moefy.moefy(mlp(), drop_fraction=1.5), ValueError,
     r"drop_fraction must be a number in \[0, 1\]")
case("moefy", lambda t: moefy.moefy(mlp(), drop_fraction=-0.1), ValueError, r"drop_fraction must be")
case("moefy", lambda t: moefy.moefy(mlp(), drop_fraction="0.5"), ValueError, r"drop_fraction must be")
case("moefy", lambda t: moefy.moefy(mlp(), drop_fraction=float("nan")), ValueError, r"drop_fraction must be")
case("moefy", lambda t: moefy.moefy(nn.Sequential(mlp()), target="0", granularity=4), ValueError,
     r"moefy target '0': granularity=4 must divide")
case("ModuleMixture", lambda t: convert.ModuleMixture(mlp(), granularity=-1), ValueError, r"granularity must be")
case("ModuleMixture", lambda t: convert.ModuleMixture(mlp(), drop_fraction=True), ValueError, r"drop_fraction must")
case("upcycled_experts", lambda t: granular.upcycled_experts("mlp", 2), TypeError, r"module must be an nn.Module")
case("upcycled_experts", lambda t: granular.upcycled_experts(mlp(), 0), ValueError, r"num_experts must be")
case("upcycled_experts", lambda t: granular.upcycled_experts(mlp(), 2, split="kmeans"), ValueError, r"split must")
case("exactness", lambda t: granular.exactness(mlp()), TypeError, r"mixture must be a MoEBlock")
case("merged_copies", lambda t: granular.merged_copies("mixture"), TypeError, r"mixture must be a MoEBlock")
case("merged_copies", lambda t: granular.merged_copies(moefy.moefy(mlp())), ValueError,
     r"mixture: not a granular mixture")
case("merge", lambda t: moefy.merge(moefy.moefy(mlp(), granularity=2), how=2), ValueError,
     r"how: expert index must be in \[0, 1\]")
case("drop_upcycle", lambda t: drop_upcycling.drop_upcycle(mlp(), mlp(), 0.5), TypeError, r"experts must be a list")
case("drop_upcycle", lambda t: drop_upcycling.drop_upcycle([mlp()], "mlp", 0.5), TypeError, r"module must be an")
case("drop_upcycle", lambda t: drop_upcycling.drop_upcycle([mlp()], mlp(), 2), ValueError, r"drop_fraction must")
case("drop_upcycle", lambda t: drop_upcycling.drop_upcycle([nn.Linear(4, 4)], mlp(), 0.5), ValueError,
     r"experts: Linear is not an FFN")
case("drop_upcycle", lambda t: drop_upcycling.drop_upcycle([nn.Linear(4, 4)], nn.ReLU(), 0.5), ValueError,
     r"drop_fraction: ReLU is not an FFN")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict(moefy.moefy(mlp(), granularity=2), {}),
     ValueError, r"model: mixture '' is granular")
case("find_ffn_parts", lambda t: ffn_parts.find_ffn_parts(None), TypeError, r"module must be an nn.Module")
case("AttentionMixture", lambda t: convert.AttentionMixture(nn.Linear(4, 4)), TypeError,
     r"module must be an nn.MultiheadAttention")
case("AttentionMixture", lambda t: convert.AttentionMixture(nn.MultiheadAttention(8, 2), route="tokens"),
     ValueError, r"route: attention must be routed per sample")
case("AttentionMixture", lambda t: mha()(torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)), ValueError,
     r"query, key, value must be batched")
case("AttentionMixture", lambda t: mha()(*[torch.randn(2, 5, 7)] * 3), ValueError, r"query must have embed_dim=8")
case("AttentionMixture", lambda t: mha()(torch.randn(2, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)),
     ValueError, r"key.*batch")
case("AttentionMixture", lambda t: mha()(torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 5, 8)),
     ValueError, r"value")
# experts from several modules (convert/sources.py) and an informed router (convert/router_init.py, kmeans.py)
L4 = lambda: nn.Linear(4, 4)  # noqa: E731
case("moefy", lambda t: moefy.moefy(L4(), experts_from=L4()), TypeError, r"experts_from must be a list of nn.Module")
case("moefy", lambda t: moefy.moefy(L4(), experts_from=[]), ValueError, r"experts_from must hold at least one")
case("moefy", lambda t: moefy.moefy(L4(), experts_from=[L4(), "fc"]), TypeError, r"experts_from\[1\] must be an nn.Module")
case("moefy", lambda t: moefy.moefy(L4(), experts_from=[L4(), nn.Linear(4, 5)]), ValueError,
     r"experts_from\[1\] \(Linear\) parameter 'weight' has shape \(5, 4\), the base's \(4, 4\)")
case("moefy", lambda t: moefy.moefy(L4(), 3, experts_from=[L4(), L4()]), ValueError,
     r"num_experts=3 but experts_from holds 2 modules")
case("moefy", lambda t: moefy.moefy(L4(), experts_from=[L4()], rest="mean"), ValueError, r"rest must be one of")
case("moefy", lambda t: moefy.moefy(L4(), experts_from=[L4()], rest="average"), ValueError,
     r"rest='average' needs target")
case("moefy", lambda t: moefy.moefy(nn.Sequential(L4()), target="0", experts_from=[nn.Sequential(nn.Linear(4, 5))]),
     ValueError, r"experts_from\[0\] \(Sequential\) state_dict entry '0.weight' has shape")
case("moefy", lambda t: moefy.moefy(L4(), router_init="centroids", router_data=[]), ValueError,
     r"router_init must be one of \('mean', 'kmeans'\)")
case("moefy", lambda t: moefy.moefy(L4(), router_init="kmeans"), ValueError, r"router_data: router_init='kmeans' needs")
case("moefy", lambda t: moefy.moefy(L4(), router_data=[torch.randn(4, 4)]), ValueError, r"router_data is given")
case("ModuleMixture", lambda t: convert.ModuleMixture(L4(), experts_from=(L4(), 3)), TypeError,
     r"experts_from\[1\] must be an nn.Module")
case("expert_copies", lambda t: sources.expert_copies(L4(), 2, [nn.Linear(4, 4, bias=False)]), ValueError,
     r"experts_from\[0\] \(Linear\) has no parameter 'bias'")
case("expert_copies", lambda t: sources.expert_copies(L4(), 2, "fc"), TypeError, r"experts_from must be a list")
case("model_sources", lambda t: sources.model_sources(nn.Sequential(L4()), ["0"], [nn.Sequential(L4())], rest="all"),
     ValueError, r"rest must be one of")
case("model_sources", lambda t: sources.model_sources(nn.Sequential(L4()), ["0"], [nn.Sequential(L4(), L4())]),
     ValueError, r"experts_from\[0\] \(Sequential\) has a state_dict entry '1.weight' that the base lacks")
case("init_router", lambda t: convert.init_router(lin(), [torch.randn(4, 4)], "kmeans", layerwise="yes"), TypeError,
     r"layerwise must be")
case("init_router", lambda t: convert.init_router("model", [torch.randn(4, 4)]), TypeError,
     r"model_or_mixture must be an nn.Module")
case("init_router", lambda t: convert.init_router(L4(), [torch.randn(4, 4)]), ValueError,
     r"model_or_mixture: Linear holds no mixture")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4)] * 2, "hidden"), ValueError,
     r"method must be one of \('mean', 'kmeans'\)")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), torch.randn(4, 4), "mean"), TypeError,
     r"data: method='mean' needs a list with one batch list per expert")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4)], "mean"), ValueError,
     r"data: method='mean' needs one batch list per expert: mixture '\(root\)' has 2 experts, data has 1")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4), []], "mean"), ValueError,
     r"data\[1\] must hold at least one batch")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4), [3]], "mean"), TypeError,
     r"data\[1\]\[0\] must be a batch")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.zeros(4, 4)] * 2), ValueError,
     r"data: a mean row of mixture '\(root\)' is the zero vector.*normalize=False")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), "x", "kmeans"), TypeError,
     r"data must be a batch")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 4), torch.randn(3, 4), "kmeans"), ValueError,
     r"data: mixture '\(root\)' read 3 router inputs, fewer than its 4 experts")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4)] * 2, scale=0), ValueError,
     r"scale must be a positive finite number")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), [torch.randn(4, 4)] * 2, normalize=1),
     TypeError, r"normalize must be True or False")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), torch.randn(4, 4), "kmeans", seed=0.5),
     ValueError, r"seed must be an int")
case("init_router", lambda t: convert.init_router(moefy.moefy(L4(), 2), torch.randn(4, 4), "kmeans", iters=0),
     ValueError, r"iters must be a positive int")
case("kmeans", lambda t: convert.kmeans([[0.0, 1.0]], 1), TypeError, r"x must be a floating-point torch.Tensor")
case("kmeans", lambda t: convert.kmeans(torch.arange(4), 1), TypeError, r"x must be a floating-point")
case("kmeans", lambda t: convert.kmeans(torch.randn(4), 1), ValueError, r"x must have shape \(N, D\)")
case("kmeans", lambda t: convert.kmeans(torch.randn(4, 2), 0), ValueError, r"k must be a positive int")
case("kmeans", lambda t: convert.kmeans(torch.randn(4, 2), 5), ValueError, r"x: k-means with k=5 clusters needs")
case("kmeans", lambda t: convert.kmeans(torch.randn(4, 2), 2, seed="0"), ValueError, r"seed must be an int")
case("merge", lambda t: moefy.merge(nn.Linear(4, 4)), TypeError, r"mixture must be a MoEBlock")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how="max"), ValueError, r"how must be")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=4), ValueError, r"how: expert index")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=[1, 2]), ValueError, r"how: weights must be")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=[1, -1, 1, 1]), ValueError, r"how: weights")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=None), TypeError, r"how must be")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=["a"] * 4), TypeError, r"how must be")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=[float("nan")] * 4), ValueError,
     r"how: weights must be")
case("merge", lambda t: moefy.merge(moefy.moefy(nn.Linear(4, 4)), how=torch.ones(2, 2)), ValueError,
     r"how: weights must be")
case("unmoefy", lambda t: moefy.unmoefy("model"), TypeError, r"model must be an nn.Module")
case("unmoefy", lambda t: moefy.unmoefy(nn.Sequential(moefy.moefy(nn.Linear(4, 4))), how=9), ValueError,
     r"how: expert index")
case("moefy_chain", lambda t: moefy.moefy_chain(BertLayer(), "intermediate"), ValueError, r"names must be")
case("moefy_chain", lambda t: moefy.moefy_chain(BertLayer(), []), ValueError, r"names must be")
case("moefy_chain", lambda t: moefy.moefy_chain(BertLayer(), ["intermediate", "nope"]), ValueError,
     r"names: BertLayer has no submodule 'nope'")
case("moefy_chain", lambda t: moefy.moefy_chain(BertLayer(), [3]), ValueError, r"names")
case("moefy_chain", lambda t: moefy.moefy_chain("parent", ["a"]), TypeError, r"parent must be an nn.Module")
case("moefy_chain", lambda t: moefy.moefy_chain(BertLayer(), ["intermediate"], num_experts=0), ValueError,
     r"num_experts must be")
case("save", lambda t: moefy.save("model", t), TypeError, r"model must be an nn.Module, got str")
case("save", lambda t: moefy.save(lin(), 3), TypeError, r"folder must be a path")
case("describe", lambda t: save_mod.describe([1]), TypeError, r"model must be an nn.Module, got list")
case("load", lambda t: moefy.load("model", t), TypeError, r"model must be an nn.Module, got str")
case("load", lambda t: moefy.load(nn.Linear(4, 4), None), TypeError, r"folder must be a path")
case("load", lambda t: moefy.load(nn.Linear(4, 4), t / "missing"), FileNotFoundError, r"folder .* does not exist")
case("load", lambda t: moefy.load(nn.Linear(4, 4), t), FileNotFoundError, r"has no moefy.json .* moefy.save")
case("load", lambda t: (moefy.save(moefy.moefy(nn.Sequential(nn.Linear(4, 4)), 2, target="0"), t),
                        moefy.load(nn.Sequential(nn.ReLU()), t)), ValueError, r"submodule '0'|pass the dense model")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict("model", {}), TypeError, r"model must be")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict(dense_checkpoint()[0], [1, 2]), TypeError,
     r"state_dict must be a mapping")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict(*dense_checkpoint(i=5)), ValueError,
     r"state_dict\['weight'\] has shape \(4, 5\) but experts.0.weight .*\(4, 4\)")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict(dense_checkpoint()[0], {"weight": 1}),
     TypeError, r"state_dict\['weight'\] must be a tensor")
case("load_dense_state_dict", lambda t: moefy.load_dense_state_dict(dense_checkpoint()[0], {}), RuntimeError,
     r"load_dense_state_dict: missing keys")
case("infer_routing", lambda t: convert.infer_routing("linear"), TypeError, r"module must be an nn.Module")
case("explain_routing", lambda t: routes.explain_routing(None), TypeError, r"module must be an nn.Module")
case("explain_routing", lambda t: routes.explain_routing(nn.Linear(2, 2), route="pixels"), ValueError, r"route must be one of")
case("explain_routing", lambda t: routes.explain_routing(nn.Linear(2, 2), input_dim=0), ValueError, r"input_dim must be")
case("probe_position_wise", lambda t: routes.probe_position_wise(nn.Linear(2, 2), 2.5), ValueError, r"input_dim must be")
case("probe_position_wise", lambda t: routes.probe_position_wise("mlp", 2), TypeError, r"module must be an nn.Module")
case("dense_key_map", lambda t: convert.dense_key_map(None), TypeError, r"model must be an nn.Module")

# ---------------------------------------------------------------------- MoE (recipes/sparse_moe.py)
case("MoE", lambda t: MoE(0, 2, 3, 8), ValueError, r"input_size must be")
case("MoE", lambda t: MoE(4, 2.0, 3, 8), ValueError, r"output_size must be")
case("MoE", lambda t: MoE(4, 2, True, 8), ValueError, r"num_experts must be")
case("MoE", lambda t: MoE(4, 2, 3, "8"), ValueError, r"hidden_size must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=4), ValueError, r"\bk must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, loss_coef=-1), ValueError, r"loss_coef must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2, loss_coef=float("nan")), ValueError, r"loss_coef must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2, loss_coef=True), ValueError, r"loss_coef must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2, noisy_gating="no"), TypeError, r"noisy_gating must be")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2, aux_criterion="prob", noisy_gating=False), ValueError,
     r"'prob'.*noise='gaussian'")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2)(torch.randn(3, 5)), ValueError, r"x must have shape")
case("MoE", lambda t: MoE(4, 2, 3, 8, k=2)(torch.ones(3, 4, dtype=torch.long)), TypeError, r"x must be a floating")

# ------------------------------------------------------------------------------- recipes/distill.py
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss([[1.0]], torch.ones(1, 1)), ValueError,
     r"expert_logits must be")
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss(torch.randn(2, 5), torch.ones(5, 2)),
     ValueError, r"expert_logits must be a tensor of shape \(E, \.\.\., C\)")
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss(torch.randn(2, 5, 3), torch.ones(5, 3)),
     ValueError, r"gates must have shape")
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss(torch.randn(2, 5, 3), torch.ones(5, 2),
                                                                          temperature=0), ValueError,
     r"temperature must be")
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss(torch.randn(2, 5, 3), torch.ones(5, 2),
                                                                          temperature=float("nan")), ValueError,
     r"temperature must be")
case("mutual_distillation_loss", lambda t: moefy.mutual_distillation_loss(torch.ones(2, 5, 3, dtype=torch.long),
                                                                          torch.ones(5, 2)), TypeError,
     r"expert_logits must be a floating")
case("mode_loss", lambda t: moefy.mode_loss(torch.ones(()), torch.ones(()), alpha=1.5), ValueError,
     r"alpha must be")
case("mode_loss", lambda t: moefy.mode_loss(torch.ones(()), torch.ones(()), alpha="0.5"), ValueError,
     r"alpha must be")
case("mode_loss", lambda t: moefy.mode_loss("loss", torch.ones(())), TypeError, r"task_loss must be")
case("mode_loss", lambda t: moefy.mode_loss(torch.ones(()), None), TypeError, r"distill_loss must be")
case("expert_logits", lambda t: distill.expert_logits("block", torch.randn(2, 4)), TypeError,
     r"block must be a MoEBlock")
case("expert_logits", lambda t: distill.expert_logits(lin(), [[0.0] * 4]), TypeError, r"x must be a torch.Tensor")
case("expert_logits", lambda t: distill.expert_logits(lin(), torch.randn(2, 5)), ValueError, r"x must have shape")
case("expert_logits", lambda t: distill.expert_logits(lin(route="samples"), torch.randn(2, 4)), ValueError,
     r"route='tokens'")
case("block_distillation_loss", lambda t: distill.block_distillation_loss(nn.Linear(4, 4), torch.randn(2, 4)),
     TypeError, r"block must be a MoEBlock")
case("block_distillation_loss", lambda t: distill.block_distillation_loss(lin(), torch.randn(2, 4)), RuntimeError,
     r"has not run a forward yet")
case("block_distillation_loss", lambda t: distill.block_distillation_loss(ran(), torch.randn(3, 4)), ValueError,
     r"block.routing is for 4 tokens but x has 3")
case("block_distillation_loss", lambda t: distill.block_distillation_loss(ran(), torch.randn(4, 5)), ValueError,
     r"x must have shape")
case("block_distillation_loss", lambda t: distill.block_distillation_loss(ran(), torch.randn(4, 4), 0), ValueError,
     r"temperature must be")

# ------------------------------------------------------------------------------- recipes/metrics.py
for _fn in (metrics.accuracy, metrics.nll, metrics.ece, metrics.reliability_bins, metrics.classification_report):
    _n = f"metrics.{_fn.__name__}"
    case(_n, lambda t, f=_fn: f([[0.5, 0.5]], torch.tensor([0])), ValueError, r"probs must be")
    case(_n, lambda t, f=_fn: f(torch.ones(2, 2, 2), torch.tensor([0, 1])), ValueError, r"probs must be")
    case(_n, lambda t, f=_fn: f(torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1])), ValueError,
         r"probs must be a floating")
    case(_n, lambda t, f=_fn: f(probs_targets()[0], torch.zeros(6)), ValueError,
         r"targets must be an integer tensor")
    case(_n, lambda t, f=_fn: f(probs_targets()[0], torch.zeros(5, dtype=torch.long)), ValueError,
         r"targets must be an integer tensor of shape \(N,\) = \(6,\)")
    case(_n, lambda t, f=_fn: f(probs_targets()[0], torch.full((6,), 3)), ValueError, r"targets must lie in \[0, 2\]")
    case(_n, lambda t, f=_fn: f(probs_targets()[0], torch.full((6,), -1)), ValueError, r"targets must lie in")
    case(_n, lambda t, f=_fn: f(torch.ones(0, 3), torch.ones(0, dtype=torch.long)), ValueError,
         r"probs and targets must hold at least one sample")
for _fn in (metrics.reliability_bins, metrics.ece, metrics.classification_report):
    case(f"metrics.{_fn.__name__}", lambda t, f=_fn: f(*probs_targets(), n_bins=0), ValueError, r"n_bins must be")
    case(f"metrics.{_fn.__name__}", lambda t, f=_fn: f(*probs_targets(), n_bins=2.5), ValueError, r"n_bins must be")
    case(f"metrics.{_fn.__name__}", lambda t, f=_fn: f(*probs_targets(), n_bins=True), ValueError, r"n_bins must be")
case("metrics.nll", lambda t: metrics.nll(*probs_targets(), eps=-1.0), ValueError, r"eps must be")
case("metrics.nll", lambda t: metrics.nll(*probs_targets(), eps="1e-12"), ValueError, r"eps must be")
case("plot_reliability", lambda t: reliability.plot_reliability({}), TypeError, r"bins must be")
case("plot_reliability", lambda t: reliability.plot_reliability([metrics.reliability_bins(*probs_targets())]),
     TypeError, r"bins must be")
case("plot_reliability", lambda t: reliability.plot_reliability({"m": "bins"}), TypeError, r"bins must be")

# ---------------------------------------------------------------------------------- data.py
case("read_idx", lambda t: data.read_idx(123), TypeError, r"path must be")
case("read_idx", lambda t: data.read_idx(Path(t) / "missing-idx1-ubyte"), FileNotFoundError, r"missing-idx1-ubyte")
case("read_idx", lambda t: data.read_idx(idx_file(t, b"\x01\x02\x08\x01")), ValueError, r"not an IDX file")
case("read_idx", lambda t: data.read_idx(idx_file(t, b"\x00\x00\x08\x03\x00\x00")), ValueError,
     r"x-idx1-ubyte.*header")
case("read_idx", lambda t: data.read_idx(idx_file(t, b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")),
     ValueError, r"header says shape \(5,\) but holds 3 values")
case("read_idx", lambda t: data.read_idx(idx_file(t, b"\x00\x00\x0b\x01" + struct.pack(">I", 2) + b"abc")),
     ValueError, r"x-idx1-ubyte: header says shape \(2,\) of torch.int16")
case("has_idx_dataset", lambda t: data.has_idx_dataset(None), TypeError, r"directory must be")
case("load_idx_dataset", lambda t: data.load_idx_dataset(Path(t) / "none"), FileNotFoundError,
     r"does not hold the IDX files")
case("load_idx_dataset", lambda t: data.load_idx_dataset(3.0), TypeError, r"directory must be")
case("load_idx_dataset", lambda t: data.load_idx_dataset(t, classes="abc"), FileNotFoundError, r"IDX files")
case("load_digits_dataset", lambda t: data.load_digits_dataset(test_fraction=1.0), ValueError,
     r"test_fraction must be a number in \(0, 1\)")
case("load_digits_dataset", lambda t: data.load_digits_dataset(test_fraction="0.2"), ValueError,
     r"test_fraction must be")
case("load_digits_dataset", lambda t: data.load_digits_dataset(test_fraction=float("nan")), ValueError,
     r"test_fraction must be")
case("load_digits_dataset", lambda t: data.load_digits_dataset(seed="0"), TypeError, r"seed must be an int")
case("load_cifar10", lambda t: data.load_cifar10(t), FileNotFoundError, r"does not hold CIFAR-10")
case("load_cifar10", lambda t: data.load_cifar10(None), TypeError, r"directory must be")
case("load_images", lambda t: data.load_images(Path(t) / "none"), FileNotFoundError,
     r"data_dir .* holds neither")
case("load_images", lambda t: data.load_images(7), TypeError, r"data_dir must be")
case("ImageDataset.subset", lambda t: dataset().subset(train=0), ValueError, r"train must be a positive int")
case("ImageDataset.subset", lambda t: dataset().subset(test=-2), ValueError, r"test must be a positive int")
case("ImageDataset.subset", lambda t: dataset().subset(train="2"), ValueError, r"train must be a positive int")
case("ImageDataset.subset", lambda t: dataset().subset(train=1.5), ValueError, r"train must be a positive int")
case("ImageDataset.subset", lambda t: dataset().subset(seed="0"), TypeError, r"seed must be an int")

# ------------------------------------------------------------------------------ observe/recorder.py
case("RoutingRecorder", lambda t: moefy.RoutingRecorder("model"), TypeError, r"model must be an nn.Module")
case("RoutingRecorder", lambda t: moefy.RoutingRecorder(nn.Linear(4, 4)), ValueError, r"model contains no MoEBlock")
case("RoutingRecorder", lambda t: moefy.RoutingRecorder(lin(), num_classes=0), ValueError, r"num_classes must be")
case("RoutingRecorder", lambda t: moefy.RoutingRecorder(lin(), num_classes=True), ValueError, r"num_classes must be")
case("RoutingRecorder", lambda t: moefy.RoutingRecorder(lin(), num_classes=2.0), ValueError, r"num_classes must be")
case("RoutingRecorder", lambda t: recorder_forward(torch.zeros(2)), TypeError, r"labels must be integer class ids")
case("RoutingRecorder", lambda t: recorder_forward(torch.zeros(5, dtype=torch.long)), ValueError,
     r"labels must have shape \(B,\) with B=2")
case("RoutingRecorder", lambda t: recorder_forward(torch.tensor([0, -1])), ValueError, r"labels must be >= 0")
case("RoutingRecorder", lambda t: recorder_forward("cats"), TypeError, r"labels must be")
case("RoutingRecorder", lambda t: recorder_forward([0.5, 1.5]), TypeError, r"labels must be integer class ids")
case("RoutingRecorder.record", lambda t: moefy.RoutingRecorder(ran()).record("nope", ran()), ValueError,
     r"name 'nope' is not a recorded block")
case("RoutingRecorder.record", lambda t: moefy.RoutingRecorder(lin()).record("", lin()), ValueError,
     r"block .*has not run a forward")
case("RoutingRecorder.record", lambda t: moefy.RoutingRecorder(lin()).record("", nn.Linear(4, 4)), TypeError,
     r"block must be a MoEBlock")
case("token_entropy", lambda t: stats.token_entropy([[0.5, 0.5]]), TypeError, r"probs must be")
case("token_entropy", lambda t: stats.token_entropy(torch.ones(3)), ValueError, r"probs must have shape \(T, E'\)")
case("labels_per_token", lambda t: stats.labels_per_token(torch.zeros(4, dtype=torch.long), "routing"), TypeError,
     r"routing must be a Routing")
case("layer_summary", lambda t: stats.layer_summary({"name": "x"}), TypeError, r"s must be a LayerStats")
case("coactivation_counts", lambda t: stats.coactivation_counts(torch.zeros(2), torch.zeros(2, dtype=torch.long), 2),
     TypeError, r"token_index must be a 1-D integer tensor")
case("coactivation_counts", lambda t: stats.coactivation_counts(torch.zeros(2, dtype=torch.long),
                                                                torch.zeros(3, dtype=torch.long), 2),
     ValueError, r"token_index and expert_index must have the same shape")
case("coactivation_counts", lambda t: stats.coactivation_counts(torch.zeros(2, dtype=torch.long),
                                                                torch.zeros(2, dtype=torch.long), 0),
     ValueError, r"num_experts")
case("top1_columns", lambda t: stats.top1_columns(lin()), TypeError, r"routing must be a Routing record")

# ----------------------------------------------------------------------------------- observe/log.py
case("read_log", lambda t: moefy.read_log(3), TypeError, r"path must be")
case("read_log", lambda t: moefy.read_log(Path(t) / "missing.jsonl"), LogFormatError, r"cannot read the log")
case("read_log", lambda t: moefy.read_log(t), LogFormatError, r"cannot read the log")
case("read_log", lambda t: moefy.read_log(log_file(t, [{"epoch": "1"}])), LogFormatError, r":1: 'epoch' must be")
case("read_log", lambda t: moefy.read_log(log_file(t), limits={"max_bytes": 1}), TypeError, r"limits must be a LogLimits")
case("LogLimits", lambda t: moelog.LogLimits(max_layers=0), ValueError, r"LogLimits.max_layers must be a positive int")
case("TrainingLogWriter", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl", mode="x"), ValueError,
     r"mode must be 'w' or 'a'")
case("TrainingLogWriter", lambda t: moefy.TrainingLogWriter(None), TypeError, r"path must be")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write("1", summary()),
     LogFormatError, r"'epoch' must be an int in \[0, 2\*\*53\], got '1'")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(1, []), ValueError,
     r"layers must hold")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(1, 3), TypeError,
     r"layers must be")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(1, ["x"]), TypeError,
     r"layers must be")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(1, [{"layer": "m"}]),
     LogFormatError, r"missing field 'routing_acc'")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(
    1, summary(), {"acc": "high"}), ValueError, r"metrics\['acc'\] must be a number")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(
    1, summary(), [("acc", 1.0)]), TypeError, r"metrics must be a mapping")
case("TrainingLogWriter.write", lambda t: moefy.TrainingLogWriter(Path(t) / "a.jsonl").write(
    1, summary(), {"loss": float("nan")}), LogFormatError, r"metric 'loss' must be a number \(finite, \|v\| <= 1e300\) or null, got nan")
case("log_entry", lambda t: moelog.log_entry(1, "abc"), TypeError, r"layers must be")

# ------------------------------------------------------------------------------- viz (load.py)
for _fn in (moefy.viz.plot_experts_load, moefy.viz.plot_total_load):
    _n = f"viz.{_fn.__name__}"
    case(_n, lambda t, f=_fn: f("block"), TypeError, r"block must be a MoEBlock")
    case(_n, lambda t, f=_fn: f(lin()), RuntimeError, r"has not run a forward yet")
    case(_n, lambda t, f=_fn: f(ran(), [1, 2, 3]), TypeError, r"expert_loads must be a torch.Tensor or numpy")
    case(_n, lambda t, f=_fn: f(ran(), torch.ones(5, 4)), ValueError, r"expert_loads must have shape \(E'=3")
    case(_n, lambda t, f=_fn: f(ran(), np.array(["a", "b", "c"])), TypeError, r"expert_loads must hold real numbers")
case("viz.display_experts_load", lambda t: moefy.viz.display_experts_load(ran(), torch.ones(3)), ValueError,
     r"expert_loads must have shape")
case("viz.display_abs_experts_load", lambda t: moefy.viz.display_abs_experts_load(ran(), torch.ones(3, 2, 2)),
     ValueError, r"expert_loads must have shape")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap(3), TypeError, r"source must be")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap({}), ValueError, r"source must map")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap({"a": [1, 2]}), TypeError,
     r"source\['a'\] must be")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap({"a": np.ones((2, 2))}), ValueError,
     r"source must map layer names to \(E,\)")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap(nn.Linear(2, 2)), ValueError,
     r"model contains no MoEBlock")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap(lin()), ValueError, r"have not run a forward")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap({"a": np.ones(0)}), ValueError,
     r"source must map")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap({"a": np.array([1.0, -1.0])}), ValueError,
     r"source\['a'\] .*>= 0")
case("viz.plot_load_heatmap", lambda t: moefy.viz.plot_load_heatmap(ran(), annotate="yes"), TypeError,
     r"annotate must be")

# ---------------------------------------------------------------------------- viz (patches.py)
case("viz.as_image", lambda t: moefy.viz.as_image("image.png"), TypeError, r"image must be a numpy array")
case("viz.as_image", lambda t: moefy.viz.as_image(np.zeros((5, 6, 7))), ValueError, r"image must be \(H, W\)")
case("viz.as_image", lambda t: moefy.viz.as_image(np.zeros(5)), ValueError, r"image must be \(H, W\)")
case("viz.as_image", lambda t: moefy.viz.as_image(np.zeros((2, 3, 8, 8))), ValueError, r"image must be \(H, W\)")
case("viz.as_image", lambda t: moefy.viz.as_image(np.zeros((0, 4))), ValueError, r"image must not be empty")
case("viz.as_image", lambda t: moefy.viz.as_image(np.array([["a", "b"], ["c", "d"]])), TypeError,
     r"image must hold numbers")
case("viz.as_image", lambda t: moefy.viz.as_image(torch.zeros(4, 4, dtype=torch.complex64)), TypeError,
     r"image must hold")
for _fn in (moefy.viz.route_image, moefy.viz.image_through_experts):
    _n = f"viz.{_fn.__name__}"
    case(_n, lambda t, f=_fn: f(IMG, "model", 2), TypeError, r"model must be an nn.Module")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 0), ValueError, r"patch_size must be")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), "2"), ValueError, r"patch_size must be")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), (2, 2, 2)), ValueError, r"patch_size must be")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 3), ValueError, r"not a multiple of patch_size 3x3")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 1), ValueError, r"wrong patch_size")
    case(_n, lambda t, f=_fn: f(IMG, nn.Linear(4, 4), 2), ValueError, r"model contains no MoEBlock")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 2, prefix_tokens=-1), ValueError, r"prefix_tokens")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 2, prefix_tokens="1"), TypeError, r"prefix_tokens must be")
    case(_n, lambda t, f=_fn: f(IMG, patch_model(), 2, preprocess=3), TypeError, r"preprocess must be callable")
case("viz.image_through_experts", lambda t: moefy.viz.image_through_experts(IMG, patch_model(), 2, fade=2),
     ValueError, r"fade must be in \[0, 1\]")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks("routing", (2, 2)), TypeError, r"routing must be a Routing")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, 4), TypeError, r"grid must be")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, (0, 2)), ValueError, r"grid must be")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, (2, 2), sample=1), ValueError,
     r"sample must be in \[0, 1\)")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, (2, 2), sample="0"), TypeError,
     r"sample must be an int")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, (2, 2), prefix_tokens=1.5), TypeError,
     r"prefix_tokens must be")
case("viz.patch_masks", lambda t: moefy.viz.patch_masks(ran().routing, (3, 3)), ValueError,
     r"routes 4 tokens per image but the patch grid is 3x3")
case("viz.plot_patch_routing", lambda t: moefy.viz.plot_patch_routing("routing"), TypeError,
     r"routing must be a PatchRouting")
case("viz.plot_patch_routing", lambda t: moefy.viz.plot_patch_routing(patch_routing(), fade=-0.1), ValueError,
     r"fade must be in \[0, 1\]")
case("viz.plot_patch_routing", lambda t: moefy.viz.plot_patch_routing(patch_routing(), fade="0.5"), ValueError,
     r"fade must be")
case("viz.plot_patch_routing", lambda t: moefy.viz.plot_patch_routing(patch_routing(), max_cols=0), ValueError,
     r"max_cols must be")
case("viz.PatchRouting", lambda t: moefy.viz.plot_patch_routing(
    patches.PatchRouting("m", "t", np.zeros((4, 4, 3)), (2, 2), np.ones((2, 2, 2), bool), ["a"], 0, [0], False)),
    ValueError, r"panel_names")

# -------------------------------------------------------------------------- viz (dashboard.py)
for _fn in (moefy.viz.plot_utilization, moefy.viz.plot_entropy, moefy.viz.plot_routing_accuracy,
            moefy.viz.plot_affinity, moefy.viz.plot_metrics, moefy.viz.plot_dashboard, moefy.viz.plot_health,
            moefy.viz.plot_max_vio, moefy.viz.plot_dead_experts, moefy.viz.plot_coactivation,
            moefy.viz.plot_transition):
    case(f"viz.{_fn.__name__}", lambda t, f=_fn: f(str(log_file(t))), TypeError,
         r"log must be a TrainingLog \(moefy.read_log\(path\)\)")
case("viz.plot_routing_accuracy", lambda t: moefy.viz.plot_routing_accuracy(moelog.read_log(log_file(
    t, [{"epoch": 1, "routing_acc": None, "entropy": 1.0, "utilization": [1.0]}]))), ValueError, r"no routing_acc")
case("viz.plot_affinity", lambda t: moefy.viz.plot_affinity(a_log(t)), ValueError, r"no 'affinity' matrix")
case("viz.plot_metrics", lambda t: moefy.viz.plot_metrics(a_log(t)), ValueError, r"no 'metrics'")
for _fn in (moefy.viz.plot_health, moefy.viz.plot_max_vio, moefy.viz.plot_dead_experts):
    case(f"viz.{_fn.__name__}", lambda t, f=_fn: f(a_log(t)), ValueError, r"no routing health fields")
case("viz.plot_coactivation", lambda t: moefy.viz.plot_coactivation(a_log(t)), ValueError, r"no 'coactivation'")
case("viz.plot_transition", lambda t: moefy.viz.plot_transition(a_log(t)), ValueError, r"no 'transition'")
case("viz.affinity_csv", lambda t: moefy.viz.affinity_csv(a_log(t)), TypeError, r"series must be a LayerSeries")
case("viz.affinity_csv", lambda t: moefy.viz.affinity_csv(a_log(t).layers["model"]), ValueError,
     r"layer 'model' logged no affinity")

# ---------------------------------------------------------------------------------------- parallel/
case("expert_parallel", lambda t: moefy.expert_parallel("model"), TypeError, r"module must be an nn.Module")
case("expert_parallel", lambda t: moefy.expert_parallel(lin(null_experts={"zero": 1})), ValueError,
     r"expert parallelism does not support null_experts")
case("expert_parallel", lambda t: moefy.expert_parallel(lin(), aux_scope="world"), ValueError,
     r"aux_scope must be one of \('global', 'local'\)")
case("expert_parallel", lambda t: moefy.expert_parallel(lin(), average_expert_grads="no"), TypeError,
     r"average_expert_grads must be")
case("expert_parallel", lambda t: moefy.expert_parallel(nn.Linear(4, 4)), ValueError, r"module contains no MoEBlock")
case("expert_parallel", lambda t: moefy.expert_parallel(lin(expert_choice=True)), ValueError,
     r"supports token choice only")
case("expert_parallel", lambda t: moefy.expert_parallel(lin(), group="world"), TypeError, r"group must be")
case("expert_parallel", lambda t: moefy.expert_parallel(lin()), RuntimeError,
     r"needs torch.distributed initialised")
case("full_state_dict", lambda t: moefy.full_state_dict("model"), TypeError, r"model must be an nn.Module")
case("full_state_dict", lambda t: moefy.full_state_dict(lin()), RuntimeError, r"needs torch.distributed initialised")
case("merge_state_dicts", lambda t: moefy.merge_state_dicts([]), ValueError, r"shards must be a non-empty")
case("merge_state_dicts", lambda t: moefy.merge_state_dicts({"w": torch.ones(1)}), TypeError,
     r"shards must be a sequence")
case("merge_state_dicts", lambda t: moefy.merge_state_dicts([{"w": torch.ones(1)}, 3]), TypeError,
     r"shards\[1\] must be a mapping")
case("merge_state_dicts", lambda t: moefy.merge_state_dicts([{"w": torch.ones(2)}, {"w": torch.ones(3)}]),
     ValueError, r"shards: replicated entry 'w' differs")
case("merge_state_dicts", lambda t: moefy.merge_state_dicts([{"w": torch.ones(2)}, {"w": [1.0, 1.0]}]),
     ValueError, r"shards: replicated entry 'w' differs")
case("sharded_names", lambda t: moefy.sharded_names("model"), TypeError, r"model must be an nn.Module")
case("sharded_params", lambda t: moefy.parallel.sharded_params("model"), TypeError, r"model must be an nn.Module")

# ------------------------------------------------------------------------------------ convert/hf.py
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn("bert"), TypeError, r"model must be an nn.Module")
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn(nn.Linear(4, 4)), ValueError,
     r"model: Linear has no BERT-style layer")
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn(BertLayer(), layers=[1]), ValueError,
     r"layers must be indices in \[0, 0\]")
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn(BertLayer(), layers=0), TypeError, r"layers must be")
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn(BertLayer(), layers=["0"]), TypeError, r"layers must be")
case("moefy_bert_ffn", lambda t: upcycle_hf.moefy_bert_ffn(BertLayer(), num_experts=0), ValueError,
     r"num_experts must be")
case("ffn_layers", lambda t: upcycle_hf.ffn_layers(None), TypeError, r"model must be an nn.Module")
case("mean_pool", lambda t: upcycle_hf.mean_pool(torch.randn(2, 5, 4), torch.ones(2, 6)), ValueError,
     r"attention_mask must have shape \(B, L\) = \(2, 5\)")
case("mean_pool", lambda t: upcycle_hf.mean_pool(torch.randn(2, 5), torch.ones(2, 5)), ValueError,
     r"last_hidden must have shape \(B, L, D\)")
case("mean_pool", lambda t: upcycle_hf.mean_pool([[0.0]], torch.ones(1, 1)), TypeError, r"last_hidden must be")
case("encode", lambda t: upcycle_hf.encode(BertLayer(), None, "one sentence"), TypeError,
     r"sentences must be a list of strings")
case("encode", lambda t: upcycle_hf.encode(BertLayer(), None, [1, 2]), TypeError, r"sentences must be")

case("plot_token_routing", lambda t: moefy.viz.plot_token_routing("abc", lin()), TypeError,
     r"tokens must be a non-empty list of token strings")
case("plot_token_routing", lambda t: moefy.viz.plot_token_routing(["a"], nn.Linear(2, 2)), ValueError,
     r"model contains no MoEBlock")
case("plot_token_routing", lambda t: moefy.viz.plot_token_routing(["a"], lin()), ValueError,
     r"needs the last forward of a token-choice")
case("plot_token_routing", lambda t: moefy.viz.plot_token_routing(["a", "b"], ran()), ValueError,
     r"tokens / sample: .* routed 1 sequence\(s\) of 4 tokens, got 2 tokens")

case("keep_save_pretrained", lambda t: save_mod.keep_save_pretrained("model"), TypeError,
     r"model must be an nn.Module")
case("save", lambda t: moefy.save(lin(), t, state_dict=[]), ValueError, r"state_dict must be a dict")

# ------------------------------------------------------------------------------------ moefy.hf
def _tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4))


case("from_hf", lambda t: moefy.hf.from_hf("mixtral"), TypeError, r"model must be a transformers model")
case("from_hf", lambda t: moefy.hf.from_hf(nn.Linear(2, 2)), ValueError,
     r"model: Linear \(model_type None\) is not a Hugging Face MoE model moefy imports")
case("export", lambda t: moefy.hf.export(nn.Linear(2, 2), t), TypeError, r"model must be a transformers model")
case("from_hf", lambda t: moefy.hf.from_hf(_tiny_mixtral(), aux="switch"), TypeError,
     r"RoutingConfig got unknown option\(s\) \['aux'\]")
case("from_hf", lambda t: moefy.hf.from_hf(_tiny_mixtral(), k=9), ValueError, r"k must be a number in \[1, 4\]")
case("include_aux_loss", lambda t: moefy.hf.include_aux_loss("model"), TypeError, r"model must be an nn.Module")
case("include_aux_loss", lambda t: moefy.hf.include_aux_loss(nn.Linear(2, 2)), ValueError, r"has no moefy block")
case("load", lambda t: moefy.hf.load(3), TypeError, r"folder must be a path")
case("load", lambda t: moefy.hf.load(t), FileNotFoundError, r"has no config.json: it was not saved from a transformers")
case("HFMoEBlock", lambda t: moefy.hf.HFMoEBlock(8, 4, 0, "silu"), ValueError, r"num_experts must be")
case("HFExpertsBlock", lambda t: moefy.hf.HFExpertsBlock(nn.Linear(8, 8), nn.Linear(8, 4), 0, 8, 4, 2, "fused"),
     ValueError, r"math must be")
case("HFMoEBlock", lambda t: moefy.hf.HFMoEBlock(8, 4, 2, "silu", shared_hidden=-1), ValueError,
     r"shared_hidden must be")
case("SwiGLU", lambda t: moefy.hf.SwiGLU(0, 4), ValueError, r"dim must be")
case("SwiGLU", lambda t: moefy.hf.SwiGLU(8, 2.5), ValueError, r"hidden must be")
case("SwiGLU", lambda t: moefy.hf.SwiGLU(8, 4, act="swish2"), ValueError, r"act must be the name of a transformers activation")


def _tiny_moe():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), moefy.moefy(nn.Linear(4, 4), num_experts=4, k=2))


_BATCHES = [torch.randn(3, 4)]
case("expert_scores", lambda t: compress.expert_scores(_tiny_moe(), _BATCHES, "rea"), ValueError,
     r"method must be one of \('frequency', 'soft', 'reap', 'ean'\)")
case("expert_scores", lambda t: compress.expert_scores(nn.Linear(4, 4), _BATCHES), ValueError, r"has no MoE block")
case("expert_scores", lambda t: compress.expert_scores(_tiny_moe(), torch.randn(3, 4)), TypeError,
     r"data must be an iterable of model inputs")
case("expert_scores", lambda t: compress.expert_scores(_tiny_moe(), []), ValueError, r"no batch to calibrate on")
case("calibrate", lambda t: compress.calibrate("model", _BATCHES), TypeError, r"model must be an nn.Module")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), 5, {"1": torch.ones(4)}), ValueError,
     r"keep=5 for 1: must be in \[2, 4\]")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), 1.5, {"1": torch.ones(4)}), ValueError,
     r"keep=1.5: a fraction of each block's experts must be in \(0, 1\]")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), "half", {"1": torch.ones(4)}), TypeError,
     r"keep must be an int, a fraction")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), 3, {"0": torch.ones(4)}), ValueError,
     r"scores do not match the model: no scores for blocks \['1'\]")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), 3, {"1": torch.ones(5)}), ValueError,
     r"scores\['1'\] has shape \(5,\)")
case("prune_experts", lambda t: compress.prune_experts(_tiny_moe(), 3, [torch.ones(4)]), TypeError,
     r"scores must be a dict")
case("merge_experts", lambda t: compress.merge_experts(_tiny_moe(), 3, {"1": torch.ones(4)}, _BATCHES, "sum"),
     ValueError, r"method must be one of \('frequency_weighted', 'average'\)")
case("cluster_experts", lambda t: compress.cluster_experts(torch.ones(4, 2), 5), ValueError,
     r"keep must be an int in \[1, 4\]")
case("cluster_experts", lambda t: compress.cluster_experts(torch.ones(4), 2), ValueError,
     r"features must be a finite \(E, F\) tensor")
case("cluster_experts", lambda t: compress.cluster_experts(torch.ones(4, 2, dtype=torch.long), 2), TypeError,
     r"features must be a floating-point torch.Tensor")
case("cluster_experts", lambda t: compress.cluster_experts(torch.ones(6, 2), 3, n_group=2), ValueError,
     r"n_group=2 must divide the number of experts \(6\) and keep \(3\)")


# ---------------------------------------------------------------------------------------- tests
class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang("no answer within 20 s")


@pytest.mark.parametrize("target,call,error,match", CASES)
def test_bad_input(target, call, error, match, tmp_path):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        with pytest.raises(error, match=match) as info:
            call(tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # raised by moefy itself: not an error surfacing from deep inside torch / numpy / the standard library
    assert type(info.value) is error or (error is ValueError and type(info.value) is LogFormatError)
    frame = Path(str(info.traceback[-1].path))
    assert frame.parent.name in ("moefy", "viz", "routing", "dispatch", "convert", "observe", "parallel", "recipes",
                                 "hf", "compress") \
        and "moefy" in frame.parts, (frame, info.value)


def _public(module, names=None):
    names = names if names is not None else getattr(module, "__all__", None) or [
        n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
        and getattr(v, "__module__", None) == module.__name__]
    return set(names)


# Names that take no input to get wrong, records built by moefy itself, or functions that need a live process
# group (covered in test_distributed.py); viz is a subpackage, swept name by name through _public(moefy.viz).
NOT_SWEPT = {
    "Routing", "AUX_LOSSES", "data", "metrics", "ReliabilityBins", "ImageDataset", "LayerStats", "LayerSeries",
    "TrainingLog", "LogFormatError", "LogLimitError", "minilm_path", "load_bert", "exchange", "gather_routing", "ShardedExperts",
    "ExpertParallelExperts", "MLPExpert", "safe_name", "compose", "new_figure", "column_names", "expert_colors",
    "layer_loads", "viz", "ROUTE_ALIASES", "Replayed", "RouteChoice", "FAMILIES", "MoEFamily", "FFNParts", "hf",
    "compress", "ExpertStats", "SCORE_METHODS", "MERGE_METHODS",
}


# the modules that convert.py and distributed.py were split into (import_module: moefy.convert.merge, read as an
# attribute, is the function merge)
CONVERT_MODULES = [import_module(f"moefy.convert.{m}") for m in ("mixture", "routes", "surgery", "merge",
                                                                      "checkpoint", "save", "sources",
                                                                      "router_init", "kmeans", "granular",
                                                                      "drop_upcycling", "ffn_parts")]
PARALLEL_MODULES = [import_module(f"moefy.parallel.{m}") for m in ("expert_parallel", "checkpoint")]


def test_every_public_name_is_swept():
    targets = {c.values[0].split(".")[-1] for c in CASES} | {c.values[0] for c in CASES}
    public = (_public(moefy) | _public(compat) | _public(moefy.viz) | _public(metrics) | _public(data)
              | _public(stats) | _public(moelog) | _public(losses) | _public(bias_balance) | _public(noise) | _public(replay) | _public(distill)
              | set().union(*map(_public, CONVERT_MODULES)) | _public(upcycle_hf)
              | set().union(*map(_public, PARALLEL_MODULES)) | _public(reliability) | _public(moefy.hf)
              | _public(compress))
    missing = sorted(public - targets - NOT_SWEPT)
    assert not missing, f"public names without a bad-input case: {missing}"
    assert len(CASES) >= 300, len(CASES)
