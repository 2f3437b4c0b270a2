"""Smoke run of examples/compress_experts.py (--quick), as a user launches it: every method's row, the sizes of the
exported checkpoints, the export check, the files it writes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "compress_experts.py"
ROWS = [("none (trained on)", 8)] + [(f"prune {s}", keep) for keep in (6, 4)
                                    for s in ("frequency", "soft", "reap", "ean", "random")] + \
    [("merge frequency_weighted", 4), ("merge average", 4)]


def test_compress_experts_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    found = re.findall(r"^\| ([a-z_ ()]+) \| (\d) of 8 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", out, flags=re.M)
    assert [(m, int(k)) for m, k, *_ in found] == ROWS, out
    rows = {(m, int(k)): (float(a), float(r), float(mb)) for m, k, a, r, mb in found}

    # the reference row is the trained model itself before its recovery steps
    base = float(re.search(r"held-out loss ([0-9.]+);", out).group(1))
    assert rows[("none (trained on)", 8)][0] == base, out
    # --quick: 2 layers, hidden 32, experts of 16. One expert fewer in both layers saves its float32 weights, gate,
    # up, down (3·32·16) and router row (32), and its 3 tensors' entries in the safetensors header (< 150 bytes
    # each); the printed MB are rounded to 0.001
    expert_bytes = 2 * (3 * 32 * 16 + 32) * 4
    full = rows[("none (trained on)", 8)][2]
    for (method, keep), (_, _, mb) in rows.items():
        saved = (full - mb) * 1e6
        assert (8 - keep) * expert_bytes - 1e3 <= saved <= (8 - keep) * (expert_bytes + 2 * 3 * 150) + 1e3, \
            (method, keep, out)

    check = re.search(r"export check: (\d+) exported models load in transformers with the compressed models' logits "
                      r"\(max \|difference\| ([0-9.e+-]+) < 1e-04\)", out)
    assert check and int(check.group(1)) == len(ROWS) and float(check.group(2)) < 1e-4, out

    table = (tmp_path / "compress_experts.md").read_text()
    assert table.strip() in out and table.count("\n") == len(ROWS) + 2
    assert (tmp_path / "compress_experts.png").stat().st_size > 10_000
