"""RoutingConfig (moefy/config.py) and the argument checks it is built from (moefy/checks.py)."""
import copy
import dataclasses
import importlib
import math
import pickle

import pytest
from torch import nn

from moefy import config as config_module
from moefy.checks import check_bool, check_choice, check_int, check_module, check_number
from moefy.config import RoutingConfig

FIELDS = [f.name for f in dataclasses.fields(RoutingConfig)]


def _find(name, *modules):
    """``name`` from the first of ``modules`` that imports (files may move into subpackages)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    pytest.skip(f"{name} not found in {modules}")


# ------------------------------------------------------------------------------------------ defaults
def test_defaults_are_moeblocks_routing_defaults():
    c = RoutingConfig()
    assert dataclasses.asdict(c) == dict(
        k=1, hole=False, noise=None, aux_criterion=None, aggregation="sum", expert_choice=False, route="tokens",
        layer_id=None, capacity_factor=1.0, capacity=None, token_capacity_factor=None, drop_policy="probs",
        normalize=True, temperature=1.0, score_func="softmax", feature_dim=-1, fused=False, selection_bias=False,
        bias_update_rate=0.0, n_group=1, topk_group=None, routed_scaling_factor=1.0, shared_gate=False,
        null_experts=None)
    assert FIELDS == ["k", "hole", "noise", "aux_criterion", "aggregation", "expert_choice", "route", "layer_id",
                      "capacity_factor", "capacity", "token_capacity_factor", "drop_policy", "normalize",
                      "temperature", "score_func", "feature_dim", "fused", "selection_bias", "bias_update_rate",
                      "n_group", "topk_group", "routed_scaling_factor", "shared_gate", "null_experts"]
    assert c.aux_weights == {} and c == RoutingConfig.from_options()


def test_every_field_is_documented_and_its_values_start_with_the_default():
    for f in dataclasses.fields(RoutingConfig):
        assert set(f.metadata) == {"values", "doc"}, f.name
        assert f.metadata["doc"].strip() and f.metadata["doc"].endswith("."), f.name
        assert f.metadata["values"].startswith(f"`{f.default!r}`"), (f.name, f.metadata["values"])


def test_allowed_values_agree_with_the_modules_that_use_them():
    assert config_module.NOISES == _find("NOISE_KINDS", "moefy.noise", "moefy.routing.noise")
    assert config_module.AGGREGATIONS == _find("AGGREGATIONS", "moefy.dispatch", "moefy.routing.dispatch")
    assert config_module.SCORE_FUNCS == _find("SCORE_FUNCS", "moefy.routing", "moefy.routing.router")


# ------------------------------------------------------------------------------------------ bad values
BAD = [
    ("k", 0, ValueError, r"^k must be a number in \[1, E\] \(the number of experts\), got 0$"),
    ("k", -1, ValueError, r"\bk must be a number"),
    ("k", "2", ValueError, r"\bk must be a number"),
    ("k", True, ValueError, r"\bk must be a number"),
    ("k", None, ValueError, r"\bk must be a number"),
    ("k", float("nan"), ValueError, r"\bk must be a number"),
    ("k", float("inf"), ValueError, r"\bk must be a number"),
    ("k", 1.5, ValueError, r"^k must be an int for token choice, got 1\.5$"),
    ("hole", "no", TypeError, r"^hole must be True or False, got 'no'$"),
    ("hole", 1, TypeError, r"hole must be True or False"),
    ("expert_choice", 0, TypeError, r"^expert_choice must be True or False, got 0$"),
    ("normalize", None, TypeError, r"^normalize must be True or False, got None$"),
    ("fused", "yes", TypeError, r"^fused must be True or False, got 'yes'$"),
    ("noise", "SIMPLE", ValueError, r"noise must be one of .*gumbel.*gaussian.*simple"),
    ("noise", "Gumbel", ValueError,
     r"^noise must be one of \('none', 'gumbel', 'gaussian', 'jitter', 'simple'\) or None, got 'Gumbel'$"),
    ("noise", 3, ValueError, r"noise must be one of"),
    ("noise", ["gumbel"], ValueError, r"noise must be one of"),
    ("aux_criterion", "load", ValueError,
     r"^aux_criterion: unknown loss 'load'; allowed: \['balance', 'cv2', 'entropy', 'global_switch', 'prob', 'seq_balance', 'switch', 'z'\]$"),
    ("aux_criterion", "Switch", ValueError, r"aux_criterion: unknown loss 'Switch'"),
    ("aux_criterion", ["switch", "zz"], ValueError, r"aux_criterion: unknown loss 'zz'; allowed"),
    ("aux_criterion", [["switch"]], ValueError, r"aux_criterion: unknown loss \['switch'\]"),
    ("aux_criterion", {1: 1.0}, ValueError, r"aux_criterion: unknown loss 1"),
    ("aux_criterion", 3, ValueError,
     r"^aux_criterion must be None, a loss name, a list of names or \{name: coefficient\}, got 3$"),
    ("aux_criterion", {"switch": -1.0}, ValueError,
     r"^aux_criterion: coefficient of 'switch' must be a number >= 0, got -1\.0$"),
    ("aux_criterion", {"switch": "1"}, ValueError, r"aux_criterion: coefficient of 'switch'"),
    ("aux_criterion", {"switch": True}, ValueError, r"aux_criterion: coefficient of 'switch'"),
    ("aux_criterion", {"switch": float("nan")}, ValueError, r"aux_criterion: coefficient"),
    ("aux_criterion", {"switch": float("inf")}, ValueError, r"aux_criterion: coefficient"),
    ("aux_criterion", "prob", ValueError, r"'prob'.*noise='gaussian'"),
    ("aggregation", "max", ValueError, r"^aggregation must be one of \('sum', 'mean'\), got 'max'$"),
    ("aggregation", None, ValueError, r"aggregation must be one of"),
    ("route", "pixels", ValueError, r"^route must be one of \('tokens', 'samples'\), got 'pixels'$"),
    ("route", 1, ValueError, r"route must be one of"),
    ("layer_id", -1, ValueError, r"^layer_id must be an int >= 0 or None, got -1$"),
    ("layer_id", "0", ValueError, r"layer_id must be an int >= 0 or None"),
    ("layer_id", 1.0, ValueError, r"layer_id must be"),
    ("capacity_factor", 0, ValueError, r"^capacity_factor must be a finite number > 0, got 0$"),
    ("capacity_factor", "2", ValueError, r"capacity_factor must be a finite number > 0"),
    ("capacity_factor", float("nan"), ValueError, r"capacity_factor must be"),
    ("capacity_factor", float("inf"), ValueError, r"capacity_factor must be"),
    ("capacity_factor", True, ValueError, r"capacity_factor must be"),
    ("capacity", 0, ValueError, r"^capacity must be a positive int or None, got 0$"),
    ("capacity", -3, ValueError, r"capacity must be a positive int"),
    ("capacity", 2.5, ValueError, r"capacity must be a positive int"),
    ("capacity", True, ValueError, r"capacity must be a positive int"),
    ("token_capacity_factor", 0, ValueError, r"^token_capacity_factor must be a finite number > 0 or None, got 0$"),
    ("token_capacity_factor", -1.5, ValueError, r"token_capacity_factor must be a finite number > 0"),
    ("token_capacity_factor", "1", ValueError, r"token_capacity_factor must be"),
    ("token_capacity_factor", True, ValueError, r"token_capacity_factor must be"),
    ("token_capacity_factor", float("nan"), ValueError, r"token_capacity_factor must be"),
    ("token_capacity_factor", float("inf"), ValueError, r"token_capacity_factor must be"),
    ("drop_policy", "score", ValueError, r"^drop_policy must be one of \('probs', 'position'\), got 'score'$"),
    ("drop_policy", None, ValueError, r"drop_policy must be one of"),
    ("temperature", 0, ValueError, r"^temperature must be a positive finite number, got 0$"),
    ("temperature", "1", ValueError, r"temperature must be a positive finite number"),
    ("temperature", float("nan"), ValueError, r"temperature must be"),
    ("temperature", float("inf"), ValueError, r"temperature must be"),
    ("temperature", -1.0, ValueError, r"temperature must be"),
    ("score_func", "relu", ValueError, r"^score_func must be one of \('softmax', 'sigmoid'\), got 'relu'$"),
    ("score_func", None, ValueError, r"score_func must be one of"),
    ("feature_dim", 1.0, TypeError, r"^feature_dim must be an int \(a dim of x\), got 1\.0$"),
    ("feature_dim", True, TypeError, r"feature_dim must be an int"),
    ("feature_dim", None, TypeError, r"feature_dim must be an int"),
    ("selection_bias", 1, TypeError, r"^selection_bias must be True or False, got 1$"),
    ("shared_gate", "yes", TypeError, r"^shared_gate must be True or False, got 'yes'$"),
    ("n_group", 0, ValueError, r"^n_group must be a positive int, got 0$"),
    ("n_group", True, ValueError, r"n_group must be a positive int"),
    ("topk_group", 2, ValueError, r"^topk_group must be an int in \[1, n_group=1\] or None, got 2$"),
    ("topk_group", 0, ValueError, r"topk_group must be an int in"),
    ("bias_update_rate", -0.5, ValueError, r"^bias_update_rate must be a number >= 0 \(0 is off\), got -0\.5$"),
    ("bias_update_rate", float("nan"), ValueError, r"bias_update_rate must be"),
    ("bias_update_rate", 0.1, ValueError, r"^bias_update_rate=0\.1 moves the selection bias: it needs selection_bias=True$"),
    ("routed_scaling_factor", 0, ValueError, r"^routed_scaling_factor must be a finite number > 0, got 0$"),
    ("routed_scaling_factor", float("inf"), ValueError, r"routed_scaling_factor must be"),
    ("null_experts", [("zero", 1)], TypeError, r"^null_experts must be None or a mapping \{kind: count\} with "
     r"kinds in \['copy', 'constant', 'zero'\], got list$"),
    ("null_experts", {"one": 1}, ValueError, r"^null_experts: unknown kind\(s\) \['one'\]; allowed: \['copy', "
     r"'constant', 'zero'\]$"),
    ("null_experts", {"zero": -1}, ValueError, r"^null_experts\['zero'\] must be an int >= 0, got -1$"),
    ("null_experts", {"copy": 1.0}, ValueError, r"null_experts\['copy'\] must be an int"),
    ("null_experts", {"copy": True}, ValueError, r"null_experts\['copy'\] must be an int"),
]


@pytest.mark.parametrize("name,value,error,match", BAD, ids=[f"{n}={v!r}" for n, v, _, _ in BAD])
def test_bad_value_raises_naming_the_field(name, value, error, match):
    with pytest.raises(error, match=match) as info:
        RoutingConfig(**{name: value})
    assert type(info.value) is error
    assert name in str(info.value)
    with pytest.raises(error, match=match):  # the same through from_options and through replace
        RoutingConfig.from_options(RoutingConfig(), **{name: value})


def test_every_field_has_a_bad_value_case():
    assert {name for name, *_ in BAD} == set(FIELDS)


def test_expert_choice_k_and_prob_need_a_consistent_set():
    assert RoutingConfig(expert_choice=True, k=0.5).k == 0.5  # expert choice: any k in (0, E']
    assert RoutingConfig(expert_choice=True, k=1.5).k == 1.5
    with pytest.raises(ValueError, match=r"\bk must be"):
        RoutingConfig(expert_choice=True, k=float("inf"))
    assert RoutingConfig(aux_criterion="prob", noise="gaussian").aux_weights == {"prob": 1.0}
    with pytest.raises(ValueError, match=r"'prob'.*noise='gaussian' and token choice"):
        RoutingConfig(aux_criterion="prob", noise="gaussian", expert_choice=True)
    with pytest.raises(ValueError, match=r"'prob'"):
        RoutingConfig(aux_criterion=["switch", "prob"], noise="gumbel")


# ------------------------------------------------------------------------------------------ normalisation
def test_images_is_the_old_name_of_samples():
    assert RoutingConfig(route="images").route == "samples"
    assert RoutingConfig(route="images") == RoutingConfig(route="samples")


@pytest.mark.parametrize("k", [2, 2.0])
def test_token_choice_k_is_stored_as_an_int(k):
    c = RoutingConfig(k=k)
    assert c.k == 2 and type(c.k) is int
    assert type(RoutingConfig(k=2.0, expert_choice=True).k) is float  # expert choice keeps the number


def test_other_normalisations():
    assert RoutingConfig(noise="none").noise is None
    assert RoutingConfig(noise="jitter").noise == "jitter"
    assert RoutingConfig(aux_criterion="none").aux_criterion is None
    assert RoutingConfig(aux_criterion=["switch", "z"]).aux_criterion == ("switch", "z")
    c = RoutingConfig(capacity_factor=2, temperature=3)
    assert type(c.capacity_factor) is float and type(c.temperature) is float
    given = {"switch": 1.0}
    c = RoutingConfig(aux_criterion=given)
    given["z"] = 1.0  # the config keeps its own copy
    assert c.aux_weights == {"switch": 1.0} and c.aux_criterion == {"switch": 1.0}


@pytest.mark.parametrize("aux,weights", [
    (None, {}),
    ("none", {}),
    ([], {}),
    ("switch", {"switch": 1.0}),
    (["switch", "z"], {"switch": 1.0, "z": 1.0}),
    (("entropy",), {"entropy": 1.0}),
    ({"z": 0.5, "entropy": 2}, {"z": 0.5, "entropy": 2.0}),
    ({"balance": 0}, {"balance": 0.0}),
])
def test_aux_weights(aux, weights):
    c = RoutingConfig(aux_criterion=aux)
    assert c.aux_weights == weights
    assert all(type(v) is float for v in c.aux_weights.values())
    c.aux_weights["cv2"] = 1.0  # a fresh dict each time: the config does not change
    assert c.aux_weights == weights


# ------------------------------------------------------------------------------------------ check_columns
def test_check_columns():
    assert RoutingConfig().check_columns(3) == 3
    assert RoutingConfig(k=3).check_columns(3) == 3
    assert RoutingConfig(k=4, hole=True).check_columns(3) == 4  # k may reach the hole column
    assert RoutingConfig(expert_choice=True, k=2.5).check_columns(3) == 3
    with pytest.raises(ValueError, match=r"^k must be a number in \[1, 3\] \(the number of experts\), got 4$"):
        RoutingConfig(k=4).check_columns(3)
    with pytest.raises(ValueError, match=r"\[1, 4\] \(the number of experts \+ hole\), got 5$"):
        RoutingConfig(k=5, hole=True).check_columns(3)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        RoutingConfig(expert_choice=True, k=2.5).check_columns(2)
    for bad in (0, "3", True, None, 2.0):
        with pytest.raises(ValueError, match=r"num_experts must be a positive int"):
            RoutingConfig().check_columns(bad)


# ------------------------------------------------------------------------------------------ from_options
def test_from_options_builds_and_replaces():
    c = RoutingConfig.from_options(k=2, noise="gumbel")
    assert c == RoutingConfig(k=2, noise="gumbel")
    d = RoutingConfig.from_options(c, hole=True, route="images")
    assert (d.k, d.noise, d.hole, d.route) == (2, "gumbel", True, "samples")
    assert (c.hole, c.route) == (False, "tokens")  # the original is unchanged
    assert RoutingConfig.from_options(c) is c
    assert RoutingConfig.from_options(None, k=3) == RoutingConfig(k=3)
    with pytest.raises(ValueError, match=r"k must be an int for token choice"):  # replacing re-validates
        RoutingConfig.from_options(RoutingConfig(expert_choice=True, k=1.5), expert_choice=False)


def test_from_options_names_unknown_options_and_lists_the_allowed_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['nosie'\]; allowed: \[") as info:
        RoutingConfig.from_options(nosie="gumbel")
    assert all(repr(name) in str(info.value) for name in FIELDS)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['experts', 'num_expert'\]"):
        RoutingConfig.from_options(RoutingConfig(), num_expert=3, experts=[], k=1)


@pytest.mark.parametrize("bad", [{"k": 2}, "k=2", 3, dataclasses])
def test_from_options_needs_a_config(bad):
    with pytest.raises(TypeError, match=r"^config must be a RoutingConfig or None, got "):
        RoutingConfig.from_options(bad)


# ------------------------------------------------------------------------------------------ value semantics
def test_frozen():
    c = RoutingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.k = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.route = "samples"


@pytest.mark.parametrize("options", [
    {}, dict(k=2, noise="gaussian", aux_criterion={"prob": 0.1, "cv2": 1e-2}),
    dict(expert_choice=True, k=1.5, capacity=4, hole=True, route="images", feature_dim=1, layer_id=3),
    dict(aux_criterion=["switch", "z"], temperature=0.5, score_func="sigmoid", fused=True, normalize=False),
])
def test_copy_pickle_and_hash_round_trip(options):
    c = RoutingConfig(**options)
    for other in (copy.deepcopy(c), copy.copy(c), pickle.loads(pickle.dumps(c)), dataclasses.replace(c)):
        assert other == c and hash(other) == hash(c)
        assert other.aux_weights == c.aux_weights and other.summary() == c.summary()
    assert len({c, RoutingConfig(**options)}) == 1
    assert c != RoutingConfig(**{**options, "layer_id": 99})


# ------------------------------------------------------------------------------------------ summary, table
def test_summary_token_choice():
    c = RoutingConfig(k=1, hole=True, noise="gumbel", aux_criterion="entropy", layer_id=0)
    assert c.summary(num_experts=3) == ("layer_id=0, experts=3, hole=True, token_choice(k=1, normalize=True), "
                                        "noise=gumbel, aux={'entropy': 1.0}, aggregation=sum, route=tokens")
    assert c.summary() == ("layer_id=0, hole=True, token_choice(k=1, normalize=True), noise=gumbel, "
                           "aux={'entropy': 1.0}, aggregation=sum, route=tokens")
    assert "aux=None" in RoutingConfig().summary()


def test_summary_expert_choice_and_non_defaults():
    assert "expert_choice(k=2, capacity=1.0x)" in RoutingConfig(expert_choice=True, k=2).summary()
    assert "expert_choice(k=2, capacity=5)" in RoutingConfig(expert_choice=True, k=2, capacity=5).summary()
    assert "capacity=2.5x" in RoutingConfig(expert_choice=True, capacity_factor=2.5).summary()
    text = RoutingConfig(route="images", feature_dim=1, temperature=2, score_func="sigmoid", fused=True,
                         aggregation="mean", normalize=False).summary()
    for part in ["route=samples", "feature_dim=1", "temperature=2.0", "score_func=sigmoid", "fused=True",
                 "aggregation=mean", "normalize=False"]:
        assert part in text, (part, text)
    for default in ["temperature", "score_func", "feature_dim", "fused"]:
        assert default not in RoutingConfig().summary()


def test_options_table_has_one_row_per_field():
    table = RoutingConfig.options_table()
    lines = table.strip().split("\n")
    assert lines[:2] == ["| option | values (default first) | meaning |", "| --- | --- | --- |"]
    rows = lines[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in FIELDS]
    for row, f in zip(rows, dataclasses.fields(RoutingConfig)):
        assert row.startswith("| ") and row.endswith(" |") and row.count(" | ") == 2  # three cells
        assert f.metadata["values"] in row and f.metadata["doc"] in row


# ------------------------------------------------------------------------------------------ checks.py
def test_check_int():
    assert check_int(3, "n") == 3
    assert check_int(None, "n", optional=True) is None
    assert check_int(0, "n", min=0) == 0 and check_int(5, "n", min=1, max=5) == 5
    cases = [
        (dict(value=True, min=1), ValueError, r"^n must be a positive int, got True$"),
        (dict(value=0, min=1), ValueError, r"^n must be a positive int, got 0$"),
        (dict(value=-1, min=0), ValueError, r"^n must be an int >= 0, got -1$"),
        (dict(value=6, min=1, max=5), ValueError, r"^n must be an int in \[1, 5\], got 6$"),
        (dict(value=6, max=5), ValueError, r"^n must be an int <= 5, got 6$"),
        (dict(value=1.0), ValueError, r"^n must be an int, got 1\.0$"),
        (dict(value=None), ValueError, r"^n must be an int, got None$"),
        (dict(value="1", min=1, optional=True), ValueError, r"^n must be a positive int or None, got '1'$"),
        (dict(value=1.5, type_error=TypeError), TypeError, r"n must be an int"),
        (dict(value=-2, min=0, type_error=TypeError), ValueError, r"n must be an int >= 0"),  # range: ValueError
        (dict(value="x", what="an int (a dim of x)"), ValueError, r"^n must be an int \(a dim of x\), got 'x'$"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            check_int(name="n", **kwargs)


def test_check_number():
    assert check_number(2, "x") == 2.0 and type(check_number(2, "x")) is float
    assert check_number(None, "x", optional=True) is None
    assert check_number(0, "x", low=0) == 0.0 and check_number(1, "x", low=0, high=1) == 1.0
    assert check_number(math.inf, "x", low=0, finite=False) == math.inf
    cases = [
        (dict(value=0, low=0, low_open=True), r"^x must be a finite number > 0, got 0$"),
        (dict(value=-1e-9, low=0), r"^x must be a finite number >= 0, got -1e-09$"),
        (dict(value=1, low=0, high=1, high_open=True), r"^x must be a number in \[0, 1\), got 1$"),
        (dict(value=0, low=0, high=1, low_open=True), r"^x must be a number in \(0, 1\], got 0$"),
        (dict(value=2, high=1), r"^x must be a finite number <= 1, got 2$"),
        (dict(value=True), r"^x must be a finite number, got True$"),
        (dict(value="1"), r"^x must be a finite number, got '1'$"),
        (dict(value=math.nan), r"x must be a finite number, got nan"),
        (dict(value=math.nan, finite=False), r"^x must be a number, got nan$"),
        (dict(value=math.inf), r"x must be a finite number, got inf"),
        (dict(value=-math.inf, low=0, finite=False), r"x must be a number >= 0, got -inf"),
        (dict(value=10 ** 400), r"x must be a finite number"),
        (dict(value=[], low=0, optional=True), r"^x must be a finite number >= 0 or None, got \[\]$"),
        (dict(value=0, low=0, low_open=True, what="a positive finite number"),
         r"^x must be a positive finite number, got 0$"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            check_number(name="x", **kwargs)
    with pytest.raises(TypeError, match=r"x must be a finite number"):
        check_number("1", "x", type_error=TypeError)


def test_check_bool_choice_module():
    assert check_bool(True, "flag") is True and check_bool(False, "flag") is False
    for bad in (0, 1, "True", None):
        with pytest.raises(TypeError, match=rf"^flag must be True or False, got {bad!r}$"):
            check_bool(bad, "flag")
    assert check_choice("a", "mode", ("a", "b")) == "a"
    assert check_choice(None, "mode", ("a", "b"), optional=True) is None
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\) or None, got 3$"):
        check_choice(3, "mode", ["a", "b"], optional=True)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        check_choice(None, "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"mode must be one of"):
        check_choice(["a"], "mode", ("a", "b"))  # unhashable, and never compared as a truth value
    layer = nn.Linear(2, 2)
    assert check_module(layer, "module") is layer
    with pytest.raises(TypeError, match=r"^module must be an nn.Module, got function$"):
        check_module(lambda x: x, "module")
    with pytest.raises(TypeError, match=r"^module must be an nn.Module, got type$"):
        check_module(nn.Linear, "module")
