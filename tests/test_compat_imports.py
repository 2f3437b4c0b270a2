"""The import lines of the original MoEfy (seed 002) and of moefy 0.1 work, while ``moefy.moefy`` stays the
conversion function, whatever a program imports first.

Each scenario runs in a new process that has not imported moefy: a driver imports torch once (what ``import moefy``
spends its time on) and forks one child per scenario.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moefy

DRIVER = r'''
import json, os, sys, traceback
os.environ["MPLBACKEND"] = "Agg"
import torch, torch.distributed.tensor  # the slow part of `import moefy`; moefy itself is imported by no one here
assert not [m for m in sys.modules if m == "moefy" or m.startswith("moefy.") or m == "matplotlib"]
failures = {}
for name, code in json.loads(sys.stdin.read()).items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    if message or status:
        failures[name] = message or f"exit status {status}"
print(json.dumps(failures))
'''

# a conversion that must still work after each import line: moefy.moefy is the function, exact at init
CONVERT = """
import torch
torch.manual_seed(0)
dense = torch.nn.Linear(4, 3)
mixture = moefy.moefy(dense, 4, k=2)
x = torch.randn(5, 4)
torch.testing.assert_close(mixture(x), dense(x))
assert type(mixture).__name__ == "ModuleMixture" and moefy.moefy is moefy.convert.moefy
"""

# seed 002's README, as written (its CustomMoEBlock, its options, its plot calls)
SEED_002 = """
import torch
from torch import nn

class CustomMoEBlock(MoEBlock):
    def __init__(self, input_dim, output_dim, num_experts, *args, **kwargs):
        experts = [nn.Linear(in_features=input_dim, out_features=output_dim) for _ in range(num_experts)]
        super().__init__(input_dim=input_dim, experts=experts, *args, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)

lin_moe = CustomMoEBlock(k=1, num_experts=3, input_dim=4, output_dim=5, expert_choice=False, hole=True,
                         noise='gumbel', aux_criterion='entropy', aggregation='sum', layer_id=0)
assert lin_moe(torch.randn(2, 10, 4)).shape == (2, 10, 5)
"""

SCENARIOS = {
    "function first": """
import importlib, sys
import moefy
function = moefy.moefy
import moefy.moefy
from moefy.moefy import MoEBlock
module = importlib.import_module("moefy.moefy")
assert moefy.moefy is function and callable(function)
assert module is sys.modules["moefy.moefy"] and module.__name__ == "moefy.moefy" and module.__all__ == ["MoEBlock"]
assert MoEBlock is module.MoEBlock is moefy.MoEBlock
""" + CONVERT,
    "from moefy.moefy import MoEBlock first": """
from moefy.moefy import MoEBlock
""" + SEED_002 + """
import moefy
assert MoEBlock is moefy.MoEBlock and lin_moe.experts_load().shape == (4, 10)  # 3 experts + the hole
""" + CONVERT,
    "import moefy.moefy first": "import moefy.moefy\n" + CONVERT + """
import sys
assert sys.modules["moefy.moefy"].MoEBlock is moefy.MoEBlock
""",
    "import_module first": """
import importlib
module = importlib.import_module("moefy.moefy")
assert module.MoEBlock.__name__ == "MoEBlock"
import moefy
assert module.MoEBlock is moefy.MoEBlock
""" + CONVERT,
    "import moefy.metrics first": """
import sys
import moefy.metrics
import moefy.recipes.metrics
assert sys.modules["moefy.metrics"] is moefy.recipes.metrics
assert moefy.metrics is moefy.recipes.metrics and moefy.metrics.ece is moefy.recipes.metrics.ece
from moefy import metrics
from moefy.metrics import accuracy
assert metrics is moefy.recipes.metrics and accuracy is moefy.recipes.accuracy
import moefy.data
assert moefy.data is moefy.compat.data and moefy.data.__name__ == "moefy.data"
assert "matplotlib" not in sys.modules
""" + CONVERT,
    "import moefy.data first": """
import moefy.data
import moefy
assert moefy.data.__name__ == "moefy.data"
from moefy.moefy import MoEBlock
assert MoEBlock is moefy.MoEBlock
""" + CONVERT,
    "moefy.utils": """
import sys
import moefy.utils
assert "matplotlib" not in sys.modules and "moefy.viz" not in sys.modules  # plots load it on first use
from moefy.moefy import MoEBlock
from moefy.utils import display_experts_load, display_abs_experts_load, image_through_experts
import moefy.viz
assert display_experts_load is moefy.viz.plot_experts_load
assert display_abs_experts_load is moefy.viz.plot_total_load
assert image_through_experts is moefy.viz.image_through_experts
assert sorted(dir(moefy.utils)) == sorted(set(dir(moefy.utils)))
assert {"display_experts_load", "display_abs_experts_load", "image_through_experts"} <= set(dir(moefy.utils))
""" + SEED_002 + """
expert_loads = lin_moe.experts_load()
figure = display_experts_load(lin_moe, expert_loads)
assert len([a for a in figure.axes if a.has_data()]) == 4  # one panel per router column (3 experts + the hole)
assert sum(int(p.get_height()) for a in figure.axes for p in a.patches) == 20  # 2 x 10 tokens, k=1
figure = display_abs_experts_load(lin_moe, expert_loads)
assert [int(p.get_height()) for p in figure.axes[0].patches] == expert_loads.sum(-1).tolist()
""" + CONVERT,
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one fresh process per scenario")
def test_old_import_lines_in_fresh_processes():
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(SCENARIOS), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"--- {name}\n{textwrap.indent(msg, '  ')}" for name, msg in failures.items())


def test_in_this_process():
    from moefy.moefy import MoEBlock
    import moefy.metrics
    import moefy.moefy
    import moefy.utils
    assert MoEBlock is moefy.MoEBlock and moefy.metrics is moefy.recipes.metrics
    assert moefy.moefy is moefy.convert.moefy  # `import moefy.moefy` rebinds nothing
    assert moefy.utils.__all__ == ["display_experts_load", "display_abs_experts_load", "image_through_experts"]
    with pytest.raises(AttributeError, match=r"module 'moefy.utils' has no attribute 'plot_experts_load'"):
        moefy.utils.plot_experts_load
    with pytest.raises(ImportError, match=r"cannot import name 'Hole' from 'moefy.moefy'"):
        exec("from moefy.moefy import Hole", {})
    dense = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(moefy.moefy(dense, 2)(x), dense(x))
