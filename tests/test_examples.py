"""Smoke runs of every example with tiny settings: each runs end to end and writes what it promises."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # tiny workloads: a second thread only adds synchronisation, and stalls badly on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quickstart(capsys):
    result = load("quickstart").main(["--steps", "3", "--batch", "32"])
    out = capsys.readouterr().out
    assert "Training Results - loss:" in out and "Evaluation Results - loss:" in out
    assert all(math.isfinite(v) for v in result.values()) and result["eval_aux"] >= 0


def test_sparse_moe_classification(capsys):
    result = load("sparse_moe_classification").main(
        ["--epochs", "1", "--train-size", "300", "--test-size", "200", "--hidden", "16"])
    out = capsys.readouterr().out
    assert "Accuracy of the network on the 200 test images" in out
    assert 0 <= result["accuracy"] <= 1 and math.isfinite(result["nll"]) and 0 <= result["ece"] <= 1
    assert sum(result["loads"]) == 200 * 4  # every test image went to k=4 experts


def test_calibrated_classifier(tmp_path, capsys):
    out_dir = tmp_path / "cc"
    result = load("calibrated_classifier").main(
        ["--epochs", "2", "--train-size", "300", "--test-size", "200", "--width", "16", "--hidden", "16",
         "--out", str(out_dir)])
    for name in ("train_log.jsonl", "results.csv", "reliability.png", "checkpoint.pt"):
        assert (out_dir / name).stat().st_size > 0, name
    with open(out_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["model"]) for r in rows] == [("1", "dense"), ("1", "moe"), ("2", "dense"), ("2", "moe")]
    assert all(0 <= float(r["ece"]) <= 1 and float(r["nll"]) > 0 for r in rows)
    lines = [json.loads(l) for l in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert len(lines[0]["utilization"]) == 4 and sum(map(sum, lines[0]["affinity"])) == 200 * 2
    assert set(lines[1]["metrics"]) >= {"moe_accuracy", "moe_nll", "moe_ece", "dense_accuracy", "dense_ece"}
    ckpt = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    assert {"dense", "moe", "args"} <= set(ckpt) and "head.router.gate.weight" in ckpt["moe"]
    assert result["final"]["moe"]["accuracy"] == pytest.approx(lines[1]["metrics"]["moe_accuracy"], abs=1e-6)


def test_mutual_distillation(capsys):
    result = load("mutual_distillation").main(
        ["--seeds", "0", "1", "--epochs", "1", "--train-size", "300", "--test-size", "200", "--hidden", "16"])
    out = capsys.readouterr().out
    assert "MoE acc %" in out and "MoDE acc %" in out and out.count("\n") >= 6
    assert len(result["moe"]) == len(result["mode"]) == 2
    assert all(0 <= a <= 1 for a in result["moe"] + result["mode"])


@pytest.mark.parametrize("fallback", [False, True])
def test_vit_demo(tmp_path, monkeypatch, capsys, fallback):
    if fallback:  # no IDX files: the demo trains on scikit-learn's 8x8 digits with 2x2 patches
        from moefy import data
        monkeypatch.setattr(data, "IDX_DIRS", (str(tmp_path / "none"),))
    images, out = tmp_path / "images", tmp_path / "run"
    result = load("vit_demo").main(
        ["--epochs", "1", "--train-size", "200", "--test-size", "100", "--dim", "16", "--show", "1",
         "--photo-height", "32", "--images", str(images), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "pictures:" in printed
    assert 0 <= result["accuracy"] <= 1
    names = sorted(p.name for p in images.iterdir())
    for layer in (0, 1):
        for stem in ("vit_expert_load", "vit_patch_routing_test0", "vit_patch_routing_grace_hopper"):
            assert f"{stem}_layer{layer}.png" in names
    assert {"vit_load_heatmap.png", "vit_dashboard.png"} <= set(names)
    assert all((images / n).stat().st_size > 2000 for n in names)
    line = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert len(line["utilization"]) == 5 and line["hole"] is True  # 4 experts + the hole
    assert ("sklearn digits" in printed) == fallback
