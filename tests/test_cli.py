"""`moefy plot LOG --out DIR` on a log from a real (short) training run, and on broken logs."""
import csv
import importlib
import json
import os
import subprocess
import sys
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn

from conftest import LinearMixture
from moefy.observe.cli import main
from moefy.observe.log import TrainingLogWriter
from moefy.observe.recorder import RoutingRecorder

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"epoch": 1, "routing_acc": 0.5, "entropy": 1.0, "utilization": [0.25, 0.75], "metrics": {"loss": 1.0}}


@pytest.fixture(scope="module")
def trained_log(tmp_path_factory):
    """Train a 2-layer patch mixture on 400 sklearn digits for 3 epochs, logging every epoch."""
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images[:400], dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target[:400])
    model = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2), nn.Linear(4, 16),
                          LinearMixture(16, 16, 4, k=1, aux_criterion="switch", layer_id=0), nn.ReLU(),
                          LinearMixture(16, 16, 3, k=1, hole=True, layer_id=1), nn.Flatten(), nn.Linear(256, 10))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    path = tmp_path_factory.mktemp("run") / "training_log.jsonl"
    with TrainingLogWriter(path) as writer, RoutingRecorder(model, num_classes=10) as rec:
        for epoch in range(1, 4):
            rec.reset()
            correct = 0
            for i in range(0, 400, 50):
                rec.labels = y[i:i + 50]
                out = model(x[i:i + 50])
                loss = nn.functional.cross_entropy(out, y[i:i + 50])
                optim.zero_grad()
                (loss + 0.01 * (model[2].aux_loss + model[4].aux_loss)).backward()
                optim.step()
                correct += int((out.argmax(1) == y[i:i + 50]).sum())
            writer.write(epoch, rec, {"loss": loss.item(), "accuracy": correct / 400})
    return path, y


def test_plot_real_log(trained_log, tmp_path, capsys):
    trained_log, labels = trained_log
    out = tmp_path / "plots"
    assert main(["plot", str(trained_log), "--out", str(out), "--dpi", "40"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["affinity.png", "affinity_2.csv", "affinity_4.csv", "dashboard.png", "entropy.png",
                       "metrics.png", "routing_accuracy.png", "utilization.png"]
    assert set(capsys.readouterr().out.split()) == {str(out / name) for name in written}
    for name in written:
        if name.endswith(".png"):
            assert mpimg.imread(out / name)[..., :3].std() > 0.05, name
    last = json.loads(trained_log.read_text().splitlines()[-1])
    layer = last["layers"][1]
    rows = list(csv.reader((out / "affinity_4.csv").open()))
    assert rows[0] == ["class", "expert 0", "expert 1", "expert 2", "hole", "count"]
    assert len(rows) == 11
    for c, row in enumerate(rows[1:]):
        counts = layer["affinity"][c]
        assert float(row[-1]) == sum(counts) == 16 * int((labels == c).sum())
        np.testing.assert_allclose([float(v) for v in row[1:-1]], np.array(counts) / sum(counts), atol=1e-6)


BAD_LOGS = {
    "malformed": ([json.dumps(GOOD), '{"epoch": 2, "routing_acc": 0.5,, "entropy": 1.0}'], 2, "not valid JSON"),
    "missing field": ([json.dumps(GOOD), json.dumps(dict(GOOD, epoch=2)),
                       json.dumps({k: v for k, v in dict(GOOD, epoch=3).items() if k != "utilization"})],
                      3, "missing field 'utilization'"),
    "empty": ([], None, "the log is empty"),
    "wrong utilization length": ([json.dumps(GOOD), json.dumps(dict(GOOD, epoch=2, utilization=[0.1, 0.2, 0.7]))],
                                 2, "'utilization' has 3 values but the first line has 2"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_bad_logs_fail_with_the_line_number(case, tmp_path, capsys):
    lines, line, message = BAD_LOGS[case]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(l + "\n" for l in lines))
    assert main(["plot", str(log), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    where = f"{log}:{line}: " if line else f"{log}: "
    assert err.startswith(f"moefy plot: error: {where}") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "moefy.observe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_subprocess_help_and_bad_log_without_traceback(tmp_path):
    helped = run_cli("--help")
    assert helped.returncode == 0 and "plot" in helped.stdout
    missing = run_cli("plot", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path))
    assert missing.returncode == 1 and "cannot read the log" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_plot_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plot", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--out DIR" in out and "LOG" in out
    with pytest.raises(SystemExit) as done:
        main(["plot", "log.jsonl"])
    assert done.value.code == 2 and "--out" in capsys.readouterr().err
    assert main([]) == 2


def test_console_script_entry_point_is_main(capsys):
    target = re.search(r'^moefy\s*=\s*"([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    module, func = target.groups()
    entry = getattr(importlib.import_module(module), func)
    assert entry is main
    with pytest.raises(SystemExit) as done:
        entry(["--help"])
    assert done.value.code == 0 and "plot" in capsys.readouterr().out
