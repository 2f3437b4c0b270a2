"""Smoke runs of every example with tiny settings: each runs end to end and writes what it promises."""
import csv
import importlib.util
import json
import math
import struct
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


def write_idx_dataset(directory: Path, train: int = 60, test: int = 30, size: int = 28) -> None:
    """Four small MNIST-style IDX files (random 28x28 images, labels 0-9), as Fashion-MNIST ships them."""
    gen = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    for split, n in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (n, size, size), generator=gen, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        (directory / f"{split}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">3I", n, size, size) + images.numpy().tobytes())
        (directory / f"{split}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + struct.pack(">I", n) + labels.numpy().tobytes())


@pytest.mark.parametrize("source", ["digits", "idx"])
def test_vit_demo(tmp_path, monkeypatch, capsys, source):
    """Both data paths, whatever this machine has installed: no IDX files (scikit-learn's 8x8 digits, 2x2
    patches) or a small IDX directory written here (28x28, 4x4 patches)."""
    from moefy import data
    monkeypatch.setattr(data, "IDX_DIRS", (str(tmp_path / "none"),))
    extra = []
    if source == "idx":
        write_idx_dataset(tmp_path / "fashion-mnist")
        extra = ["--data-dir", str(tmp_path / "fashion-mnist")]
    images, out = tmp_path / "images", tmp_path / "run"
    result = load("vit_demo").main(
        ["--epochs", "1", "--train-size", "200", "--test-size", "100", "--dim", "16", "--show", "1",
         "--photo-height", "32", "--images", str(images), "--out", str(out), *extra])
    printed = capsys.readouterr().out
    key = {"digits": "digits", "idx": "fashion-mnist"}[source]
    assert result["data"] == key and ("sklearn digits" in printed) == (source == "digits")
    assert "ViT, MoE MLPs" in printed and "ViT, dense MLPs (same active FLOPs)" in printed
    for model in ("moe", "dense"):
        assert 0 <= result["results"][model]["accuracy"] <= 1
    # the MoE model holds 4 copies of each MLP and two routers; the dense one its plain MLPs
    moe, dense = result["results"]["moe"]["params"], result["results"]["dense"]["params"]
    mlp = 2 * (16 * 32 + 32 + 32 * 16 + 16)  # depth 2, dim 16, hidden 32
    assert moe - dense == 3 * mlp + 2 * 16 * 5  # 3 more copies per MLP + routers (5 columns: 4 + hole)
    names = sorted(p.name for p in images.iterdir())  # every picture names its data set
    for layer in (0, 1):
        for stem in ("expert_load", "patch_routing_test0", "patch_routing_grace_hopper"):
            assert f"vit_{key}_{stem}_layer{layer}.png" in names
    assert {f"vit_{key}_load_heatmap.png", f"vit_{key}_dashboard.png"} <= set(names)
    assert all(n.startswith(f"vit_{key}_") and (images / n).stat().st_size > 2000 for n in names)
    lines = [json.loads(l) for l in (out / key / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and len(lines[0]["utilization"]) == 5 and lines[0]["hole"] is True  # 4 experts + hole
    for name, utilization in result["utilization"].items():
        assert len(utilization) == 5 and math.isclose(sum(utilization), 1.0), name
