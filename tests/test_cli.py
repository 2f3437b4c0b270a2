"""`moefy plot LOG --out DIR` on a log from a real (short) training run, and on broken logs."""
import contextlib
import csv
import importlib
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
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
                       "health.png", "metrics.png", "routing_accuracy.png", "utilization.png"]
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


# --------------------------------------------------------------------------- moefy plot is bounded (issue 23)
class Overtime(Exception):
    """Raised by SIGALRM: not an OSError, which main() would turn into an exit status."""


@contextlib.contextmanager
def bounded(seconds, extra_bytes=2 << 30):
    """Abort after ``seconds``; cap the address space ``extra_bytes`` above today's (a log that reads
    /dev/zero must not take the machine's memory), restored after."""
    def overtime(*_):
        raise Overtime(f"still running after {seconds} s")
    old_handler = signal.signal(signal.SIGALRM, overtime)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, old_limit[1]))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, old_handler)


def entry(epoch=1, columns=2, **extra):
    return {"epoch": epoch, "routing_acc": 0.5, "entropy": 0.69, "utilization": [1 / columns] * columns, **extra}


def hostile_log(kind, folder: Path) -> Path:
    """The issue's hostile logs (53 KB with 2,000 metrics, 97 KB with 600 layers, 313 KB with 20,000 affinity
    rows) and their kin, made in ``folder``."""
    path = folder / f"{kind}.jsonl"
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        line = {"metrics": entry(metrics={f"train/metric_{i:04d}": 0.5 for i in range(2000)}),
                "layers": entry(layers=[entry(layer=f"model.layers.{i}.mlp.experts", dropped=0.0) for i in range(600)]),
                "affinity": entry(affinity=[[10000 + i % 97, 1000 + 7 * i % 89] for i in range(20000)]),
                "columns": entry(columns=5000),
                "small": entry(metrics={"loss": 1.0}),
                }.get(kind)
        if kind == "one_element_rows":  # 16 MB, inside --max-log-mb: json would build 4M lists (~500 MB)
            text = json.dumps(entry(columns=1))[:-1] + ', "affinity": [' + "[0]," * ((4 << 20) - 1024) + "[0]]}"
        elif kind == "over_16_mb":
            text = json.dumps(entry()) + "\n" + " " * (16 << 20)
        else:
            text = json.dumps(line)
        path.write_text(text + "\n")
    return path


HOSTILE = {  # kind: (extra arguments, exit status, stderr after "moefy plot: error: " (regex))
    "metrics": ([], 1, r"{log}:1: the number of metric names is 2,000, above the limit max_metrics=16 "
                       r"\(--max-metrics raises it\)"),
    "layers": ([], 1, r"{log}:1: the number of layers \('layers'\) is 600, above the limit max_layers=16 "
                      r"\(--max-layers raises it\)"),
    "affinity": ([], 1, r"{log}:1: the number of 'affinity' rows \(classes\) is 20,000, above the limit "
                        r"max_affinity_rows=512 \(--max-affinity-rows raises it\)"),
    "columns": ([], 1, r"{log}:1: the number of router columns \('utilization'\) is 5,000, above the limit "
                       r"max_columns=256 \(--max-columns raises it\)"),
    "one_element_rows": ([], 1, r"{log}:1: the line holds 4,193,283 lists \(bytes '\['\), more than the 21,607 a "
                                r"line within the limits can hold: above the limit max_affinity_rows=512 "
                                r"\(--max-affinity-rows raises it\)"),
    "over_16_mb": ([], 1, r"{log}: the log's size in bytes is 16,777,\d{3}, above the limit max_bytes=16,777,216 "
                          r"= 16 MiB \(--max-log-mb raises it\)"),
    "dev_zero": ([], 1, r"{log}: cannot read the log: not a regular file \(a character device\)"),
    "fifo": ([], 1, r"{log}: cannot read the log: not a regular file \(a FIFO\)"),
    "folder": ([], 1, r"{log}: cannot read the log: not a regular file \(a directory\)"),
    "small": (["--dpi", "100000"], 2, r"--dpi must be in \[10, 600\] \(the limit max_dpi=600; --max-dpi raises "
                                      r"it\), got 100000"),
    "small ": (["--dpi", "100000", "--max-dpi", "100000"], 1,
               r"{log}: utilization.png would be 420,000 x 300,000 pixels \(126,000.0 megapixels\) at --dpi 100000, "
               r"above the limit max_megapixels=16 \(--max-megapixels raises it, a lower --dpi shrinks the image\)"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_logs_fail_fast_with_one_line_naming_the_limit(kind, tmp_path):
    """Each fails in under 2 s with under 200 MB traced, exit status != 0, one stderr line naming the file and
    the limit (and the flag that raises it), no traceback, nothing written. On the code before, the first
    three ran past 90 s, /dev/zero read until MemoryError, a FIFO blocked, --dpi 100000 was a bad_alloc."""
    args, status, message = HOSTILE[kind]
    log = hostile_log(kind.strip(), tmp_path)
    out = tmp_path / "plots"
    err = io.StringIO()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with bounded(10), contextlib.redirect_stderr(err):
            code = main(["plot", str(log), "--out", str(out), *args])
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    stderr = err.getvalue()
    assert code == status and "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert re.fullmatch(r"moefy plot: error: " + message.replace("{log}", re.escape(str(log))) + "\n", stderr), stderr
    assert seconds < 2 and peak < 200e6, (seconds, peak / 1e6)
    assert not out.exists()


def test_plot_subprocess_bounds_time_and_memory(tmp_path):
    """The CLI in a fresh process (imports done first): each hostile log fails in < 2 s with its peak RSS
    < 200 MB above the imports; a torn log draws with a warning line."""
    logs = {kind: str(hostile_log(kind, tmp_path)) for kind in ("metrics", "layers", "affinity", "dev_zero", "small")}
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(entry(1)) + "\n" + json.dumps(entry(2))[:20])
    cases = [[logs["metrics"]], [logs["layers"]], [logs["affinity"]], [logs["dev_zero"]],
             [logs["small"], "--dpi", "100000"], [logs["small"], "--dpi", "100000", "--max-dpi", "100000"],
             [str(torn), "--dpi", "20"]]
    script = f"""
import contextlib, io, json, resource, sys, time
import moefy.observe.cli, moefy.viz.dashboard
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.RLIM_INFINITY))  # /dev/zero read on the old code
base, results = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, []
for i, args in enumerate({cases!r}):
    err, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = moefy.observe.cli.main(["plot", args[0], "--out", {str(tmp_path)!r} + f"/out{{i}}", *args[1:]])
    results.append([code, time.perf_counter() - start, err.getvalue()])
print(json.dumps({{"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "results": results}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    *hostile, (torn_code, _, torn_err) = report["results"]
    for (code, seconds, stderr), args in zip(hostile, cases):
        assert code in (1, 2) and seconds < 2 and stderr.count("\n") == 1, (args, code, seconds, stderr)
        assert stderr.startswith("moefy plot: error: ") and "raises it" in stderr or "regular file" in stderr
    assert report["grew_mb"] < 200, report
    assert torn_code == 0 and torn_err.startswith(f"moefy plot: warning: {torn}:2: skipped the torn last line "
                                                  f"(20 bytes without a newline"), torn_err


def test_each_limit_names_its_flag_and_the_flag_raises_it(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    layers = [entry(columns=3, layer=name, affinity=[[1, 2, 3]] * 3) for name in "abc"]
    log.write_text("".join(json.dumps(entry(e, columns=3, layers=layers, metrics={"x": 1, "y": 2, "z": 3})) + "\n"
                           for e in (1, 2)))
    at_limits = {"--max-layers": "3", "--max-metrics": "3", "--max-columns": "3", "--max-affinity-rows": "3"}
    for flag in at_limits:
        args = [a for f, v in dict(at_limits, **{flag: "2"}).items() for a in (f, v)]
        assert main(["plot", str(log), "--out", str(tmp_path / "no"), *args]) == 1
        err = capsys.readouterr().err
        limit = flag[2:].replace("-", "_")
        assert err.count("\n") == 1 and err.endswith(f"3, above the limit {limit}=2 ({flag} raises it)\n"), err
    assert main(["plot", str(log), "--out", str(tmp_path / "no"), "--max-megapixels", "0.1"]) == 1
    assert "utilization.png would be 1,512 x 360 pixels (0.5 megapixels) at --dpi 120, above the limit " \
           "max_megapixels=0.1 (--max-megapixels raises it" in capsys.readouterr().err
    assert main(["plot", str(log), "--out", str(tmp_path / "no"), "--max-dpi", "100"]) == 2
    assert not (tmp_path / "no").exists()
    args = [a for item in at_limits.items() for a in item]
    assert main(["plot", str(log), "--out", str(tmp_path / "plots"), "--dpi", "20", *args]) == 0
    assert len(list((tmp_path / "plots").glob("affinity_*.csv"))) == 3


def test_plot_never_follows_a_symlink_planted_in_out(tmp_path, capsys):
    """A symlink at each output name (to a file outside, or dangling) is replaced by the plot; what it pointed
    to is untouched and no file appears where the dangling one pointed."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(entry(metrics={"loss": 1.0}, affinity=[[1, 2]])) + "\n")
    out = tmp_path / "plots"
    out.mkdir()
    names = ["utilization.png", "entropy.png", "routing_accuracy.png", "affinity.png", "metrics.png",
             "affinity.csv", "dashboard.png"]
    victims = {}
    for name in names:
        victims[name] = tmp_path / f"victim_{name}"
        victims[name].write_bytes(b"precious")
        (out / name).symlink_to(victims[name])
    (out / "dashboard.png").unlink()
    (out / "dashboard.png").symlink_to(tmp_path / "elsewhere" / "created.png")  # dangling
    (tmp_path / "elsewhere").mkdir()
    assert main(["plot", str(log), "--out", str(out), "--dpi", "20"]) == 0
    for name in names:
        assert not (out / name).is_symlink() and (out / name).is_file(), name
        assert (out / name).read_bytes()[:4] == (b"clas" if name.endswith(".csv") else b"\x89PNG"), name
        if name != "dashboard.png":
            assert victims[name].read_bytes() == b"precious", name
    assert not (tmp_path / "elsewhere" / "created.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary file left
    capsys.readouterr()
    (out / "entropy.png").unlink()
    (out / "entropy.png").mkdir()  # an output name that cannot be replaced: one line, no temporary left
    assert main(["plot", str(log), "--out", str(out), "--dpi", "20"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moefy plot: error: cannot write to {out}: ") and "entropy" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- routing health (issue 24, part 4)
def test_plot_draws_the_health_dashboard_and_skips_it_for_old_logs(tmp_path, capsys):
    from moefy.observe.log import read_log
    from moefy.viz.dashboard import plot_coactivation, plot_health, plot_transition
    layer = entry(columns=3, hole=True)
    lines = [dict(layer, epoch=e, layers=[
        dict(layer, layer="a", max_vio=v, max_vio_batch=v + 0.1, dead=dead, cv=0.3, load_entropy=0.6,
             coactivation=[[5, 2], [2, 3]], transition_to="b", transition=[[4, 1, 0], [0, 3, 0], [1, 0, 1]]),
        dict(layer, layer="b", max_vio=v / 2, dead=[], coactivation=[[4, 1], [1, 4]])])
        for e, v, dead in ((1, 0.8, [1]), (2, 0.4, []))]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "plots"
    assert main(["plot", str(log), "--out", str(out), "--dpi", "40"]) == 0
    assert "health.png" in {p.name for p in out.iterdir()}
    image = mpimg.imread(out / "health.png")
    assert image.shape[:2] == (round(3.4 * 2 * 40), round(4.2 * 3 * 40)) and image[..., :3].std() > 0.05
    parsed = read_log(log)
    fig = plot_health(parsed)                            # MaxVio, dead, load entropy; 2 co-activations; 1 transition
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 6
    max_vio_ax = fig.axes[0]
    assert [list(line.get_ydata()) for line in max_vio_ax.get_lines()][:2] == [[0.8, 0.4], [0.9, 0.5]]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [1, 0]            # dead experts of a per epoch
    coact = plot_coactivation(parsed).axes[0].images[0].get_array()
    np.testing.assert_allclose(coact.filled(np.nan), [[np.nan, 2 / 5], [2 / 3, np.nan]])
    trans = plot_transition(parsed).axes[0].images[0].get_array()
    np.testing.assert_allclose(trans, [[0.8, 0.2, 0], [0, 1, 0], [0.5, 0, 0.5]])
    capsys.readouterr()
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(entry(metrics={"loss": 1.0}, affinity=[[1, 2]])) + "\n")
    assert main(["plot", str(old), "--out", str(tmp_path / "old"), "--dpi", "20"]) == 0
    err = capsys.readouterr().err
    assert err == f"moefy plot: skipped health.png: {old}: no routing health fields (max_vio, dead, ...) in the log\n"
    assert not (tmp_path / "old" / "health.png").exists()
