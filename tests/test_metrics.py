"""Accuracy, NLL, ECE and reliability bins against values computed by hand."""
import math

import pytest
import torch

from moefy.recipes.metrics import accuracy, classification_report, ece, nll, reliability_bins

# 4 samples, 3 classes. confidences 0.62, 0.9, 0.5, 0.7; predictions 0, 1, 2, 0; targets 0, 1, 0, 1
PROBS = torch.tensor([[0.62, 0.28, 0.1],
                      [0.05, 0.9, 0.05],
                      [0.25, 0.25, 0.5],
                      [0.7, 0.2, 0.1]], dtype=torch.float64)
TARGETS = torch.tensor([0, 1, 0, 1])


def test_accuracy_and_nll_by_hand():
    assert accuracy(PROBS, TARGETS) == pytest.approx(0.5)
    want = -(math.log(0.62) + math.log(0.9) + math.log(0.25) + math.log(0.2)) / 4
    assert nll(PROBS, TARGETS) == pytest.approx(want, rel=1e-6)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0]])
    assert nll(probs, torch.tensor([1])) == pytest.approx(-math.log(1e-12))


def test_ece_15_bins_by_hand():
    # 15 bins of width 1/15: 0.62 → (9/15, 10/15] bin 9; 0.9 → bin 13; 0.5 → bin 7; 0.7 → (10/15, 11/15] bin 10
    # every bin holds one sample: ECE = (|1-0.62| + |1-0.9| + |0-0.5| + |0-0.7|) / 4
    assert ece(PROBS, TARGETS) == pytest.approx((0.38 + 0.1 + 0.5 + 0.7) / 4)
    bins = reliability_bins(PROBS, TARGETS)
    assert bins.counts.tolist() == [0] * 7 + [1, 0, 1, 1, 0, 0, 1, 0]


def test_ece_shared_bins_by_hand():
    # 2 bins: (0, .5] holds conf 0.5 (wrong); (.5, 1] holds 0.62 ✓, 0.9 ✓, 0.7 ✗
    # ECE = 1/4·|0 − 0.5| + 3/4·|2/3 − (0.62+0.9+0.7)/3| = 0.125 + 0.75·|0.6667 − 0.74|
    want = 0.25 * 0.5 + 0.75 * abs(2 / 3 - 2.22 / 3)
    assert ece(PROBS, TARGETS, n_bins=2) == pytest.approx(want)
    bins = reliability_bins(PROBS, TARGETS, n_bins=2)
    assert bins.counts.tolist() == [1, 3]
    torch.testing.assert_close(bins.confidence, torch.tensor([0.5, 2.22 / 3], dtype=torch.float64))
    torch.testing.assert_close(bins.accuracy, torch.tensor([0.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(bins.edges, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


def test_bin_edges_are_right_closed():
    # confidence exactly 0.5 belongs to (0, 0.5], 1.0 to the last bin
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    bins = reliability_bins(probs, torch.tensor([0, 0]), n_bins=2)
    assert bins.counts.tolist() == [1, 1]
    assert torch.isnan(reliability_bins(probs, torch.tensor([0, 0]), n_bins=4).confidence[0])


def test_perfect_calibration_has_zero_ece():
    # 10 samples at confidence 0.8, 8 of them right
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    targets = torch.tensor([0] * 8 + [1] * 2)
    assert ece(probs, targets) == pytest.approx(0.0, abs=1e-12)
    report = classification_report(probs, targets)
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["nll"] == pytest.approx(-(8 * math.log(0.8) + 2 * math.log(0.2)) / 10)


@pytest.mark.parametrize("probs, targets, match", [
    (torch.ones(3), torch.zeros(3, dtype=torch.long), "probs"),
    (torch.ones(3, 2) / 2, torch.zeros(2, dtype=torch.long), "targets"),
    (torch.ones(3, 2) / 2, torch.zeros(3), "targets"),
    (torch.ones(3, 2) / 2, torch.tensor([0, 1, 2]), "targets"),
])
def test_bad_input(probs, targets, match):
    with pytest.raises(ValueError, match=match):
        ece(probs, targets)


def test_bad_n_bins():
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(PROBS, TARGETS, n_bins=0)


def test_reliability_diagram_returns_a_figure(tmp_path):
    from matplotlib.figure import Figure

    from moefy.recipes.reliability import plot_reliability
    bins = {"dense": reliability_bins(PROBS, TARGETS), "moe": reliability_bins(PROBS, TARGETS, n_bins=2)}
    fig = plot_reliability(bins)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert "ECE" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="bins"):
        plot_reliability({})
