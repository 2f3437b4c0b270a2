"""Bad input gets a clear ValueError / TypeError naming the argument and what is allowed."""
import pytest
import torch
from torch import nn

from conftest import LinearMixture


@pytest.mark.parametrize("options,error,match", [
    (dict(k=4), ValueError, r"k must be a number in \[1, 3\]"),
    (dict(k=0), ValueError, r"k must be"),
    (dict(k=-1), ValueError, r"k must be"),
    (dict(k=1.5), ValueError, r"k must be an int"),
    (dict(k=True), ValueError, r"k must be"),
    (dict(noise="simpel"), ValueError, r"noise must be one of .*gumbel.*gaussian.*simple"),
    (dict(aux_criterion="load"), ValueError, r"aux_criterion: unknown loss 'load'; allowed"),
    (dict(aux_criterion={"switch": -1.0}), ValueError, r"coefficient of 'switch'"),
    (dict(aux_criterion="prob"), ValueError, r"'prob'.*noise='gaussian'"),
    (dict(aggregation="max"), ValueError, r"aggregation must be one of \('sum', 'mean'\)"),
    (dict(route="pixels"), ValueError, r"route must be one of"),
    (dict(expert_choice=True, capacity_factor=0), ValueError, r"capacity_factor must be a finite number > 0"),
    (dict(expert_choice=True, capacity=0), ValueError, r"capacity must be a positive int"),
    (dict(expert_choice=True, capacity=2.5), ValueError, r"capacity must be a positive int"),
    (dict(score_func="relu"), ValueError, r"score_func must be one of"),
    (dict(temperature=0), ValueError, r"temperature must be a positive finite number"),
    (dict(nosie="gumbel"), TypeError, r"unknown option\(s\) \['nosie'\]; allowed"),
])
def test_bad_constructor_options(options, error, match):
    with pytest.raises(error, match=match):
        LinearMixture(4, 2, num_experts=3, **options)


def test_k_may_reach_the_hole_column():
    LinearMixture(4, 2, num_experts=3, k=4, hole=True)
    with pytest.raises(ValueError, match=r"\[1, 4\] \(the number of experts \+ hole\)"):
        LinearMixture(4, 2, num_experts=3, k=5, hole=True)


def test_bad_experts_and_dims():
    from moefy import MoEBlock

    class M(MoEBlock):
        def expert_forward(self, e, x):
            return e(x)

    with pytest.raises(TypeError, match="experts must be a non-empty list of nn.Module"):
        M(experts=[], input_dim=4)
    with pytest.raises(TypeError, match="experts must be a non-empty list of nn.Module"):
        M(experts=[lambda x: x], input_dim=4)
    with pytest.raises(ValueError, match="input_dim must be a positive int"):
        M(experts=[nn.Linear(4, 4)], input_dim=0)
    with pytest.raises(ValueError, match="num_experts=2 but 1 experts"):
        M(experts=[nn.Linear(4, 4)], input_dim=4, num_experts=2)


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(3, 5), ValueError, r"x must have shape \(..., input_dim=4\), got \(3, 5\)"),
    (torch.randn(()), ValueError, r"input_dim=4"),
    (torch.ones(3, 4, dtype=torch.long), TypeError, r"floating-point tensor, got dtype torch.int64"),
    (torch.ones(3, 4, dtype=torch.bool), TypeError, r"floating-point"),
    ([[0.0] * 4], TypeError, r"x must be a torch.Tensor, got list"),
])
def test_bad_forward_input(x, error, match):
    with pytest.raises(error, match=match):
        LinearMixture(4, 2, num_experts=3)(x)


def test_routing_views_before_forward():
    with pytest.raises(RuntimeError, match="has not run a forward yet"):
        LinearMixture(4, 2, num_experts=3).experts_load()


def test_expert_output_with_wrong_rows_is_named():
    from moefy import MoEBlock

    class M(MoEBlock):
        def __init__(self):
            super().__init__(experts=[nn.Linear(4, 4)], input_dim=4)

        def expert_forward(self, e, x):
            return e(x).sum(0, keepdim=True)

    with pytest.raises(ValueError, match=r"expert_forward of expert 0 returned shape \(1, 4\), expected \(5, ...\)"):
        M()(torch.randn(5, 4))
