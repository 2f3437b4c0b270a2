"""The public API: the curated top level, the old names served from moefy.compat, and the README that lists them."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moefy
from moefy import compat

README = Path(__file__).parent.parent / "README.md"

CURATED = [
    "MoEBlock", "RoutingConfig", "Routing", "aux_loss", "moe_blocks",
    "moefy", "moefy_chain", "merge", "unmoefy", "load_dense_state_dict", "ModuleMixture", "AttentionMixture",
    "save", "load", "hf", "compress",
    "RoutingRecorder", "TrainingLogWriter", "read_log", "LogFormatError", "viz",
    "expert_parallel", "sharded_names", "merge_state_dicts", "full_state_dict",
    "MoE", "mutual_distillation_loss", "mode_loss", "block_distillation_loss",
]

# each curated name: the module it comes from (its new home, where internals are imported from)
HOMES = {
    "MoEBlock": "moefy.block", "RoutingConfig": "moefy.config", "Routing": "moefy.routing",
    "aux_loss": "moefy.block", "moe_blocks": "moefy.block", "moefy": "moefy.convert", "moefy_chain": "moefy.convert",
    "merge": "moefy.convert", "unmoefy": "moefy.convert", "load_dense_state_dict": "moefy.convert",
    "ModuleMixture": "moefy.convert", "AttentionMixture": "moefy.convert", "save": "moefy.convert.save",
    "load": "moefy.convert.save", "RoutingRecorder": "moefy.observe",
    "TrainingLogWriter": "moefy.observe", "read_log": "moefy.observe", "LogFormatError": "moefy.observe",
    "expert_parallel": "moefy.parallel", "sharded_names": "moefy.parallel", "merge_state_dicts": "moefy.parallel",
    "full_state_dict": "moefy.parallel", "MoE": "moefy.recipes", "mutual_distillation_loss": "moefy.recipes",
    "mode_loss": "moefy.recipes", "block_distillation_loss": "moefy.recipes",
}

# each compat name: (its new home, its name there)
COMPAT = {
    "Router": ("moefy.routing.router", "Router"), "cv_squared": ("moefy.routing.losses", "cv_squared"),
    "AUX_LOSSES": ("moefy.routing.losses", "AUX_LOSSES"), "data": ("moefy", None),
    "metrics": ("moefy.recipes", "metrics"), "display_experts_load": ("moefy.viz.load", "plot_experts_load"),
    "display_abs_experts_load": ("moefy.viz.load", "plot_total_load"), "ROUTE_ALIASES": ("moefy.compat", None),
}


def _home(module, name):
    __import__(module)
    return getattr(sys.modules[module], name)


# --------------------------------------------------------------------------------------- top level
def test_all_is_exactly_the_curated_list():
    assert moefy.__all__ == CURATED
    assert dir(moefy) == sorted(CURATED)


def test_every_curated_name_resolves_to_its_home():
    for name in CURATED:
        value = getattr(moefy, name)
        if name in ("viz", "hf", "compress"):
            assert value is sys.modules[f"moefy.{name}"] and value.__name__ == f"moefy.{name}"
        else:
            assert value is _home(HOMES[name], name), name
    assert set(HOMES) | {"viz", "hf", "compress"} == set(CURATED)


def test_star_import_gives_the_curated_names():
    scope = {}
    exec("from moefy import *", scope)
    assert set(scope) - {"__builtins__"} == set(CURATED)


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_import_moefy_loads_neither_matplotlib_nor_compat():
    loaded = "print(sorted(m for m in ('matplotlib', 'moefy.viz', 'moefy.compat') if m in sys.modules))"
    out = _run(f"import sys, moefy; moefy.RoutingConfig(); {loaded}; moefy.Router, moefy.data, moefy.metrics; "
               f"{loaded}; moefy.viz; {loaded}")
    # the old non-plot names load compat but not matplotlib; moefy.viz loads it
    assert out == ["[]", "['moefy.compat']", "['matplotlib',", "'moefy.compat',", "'moefy.viz']"]


def test_unknown_attribute_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match=r"^module 'moefy' has no attribute 'display_expert_load'$"):
        moefy.display_expert_load
    with pytest.raises(AttributeError, match=r"'nope'"):
        getattr(moefy, "nope")
    assert not hasattr(moefy, "Routers")
    with pytest.raises(ImportError, match=r"cannot import name 'Routers' from 'moefy'"):
        exec("from moefy import Routers", {})
    with pytest.raises(AttributeError, match=r"module 'moefy.compat' has no attribute 'plot_experts_load'"):
        compat.plot_experts_load


# -------------------------------------------------------------------------------------------- compat
def test_every_compat_name_is_the_object_at_its_new_home():
    assert compat.__all__ == list(COMPAT)
    for name, (module, attr) in COMPAT.items():
        value = getattr(compat, name)
        if name == "data":
            assert value is sys.modules["moefy.data"] and value.__name__ == "moefy.data"
        elif attr is not None:
            assert value is _home(module, attr), name
    assert set(dir(compat)) >= set(COMPAT)
    assert moefy.routing.Router is compat.Router and moefy.routing.AUX_LOSSES is compat.AUX_LOSSES


def test_old_top_level_names_are_served_from_compat_without_a_warning(recwarn):
    assert moefy._OLD_NAMES == compat.TOP_LEVEL == ("Router", "cv_squared", "AUX_LOSSES", "data", "metrics")
    for name in compat.TOP_LEVEL:
        assert getattr(moefy, name) is getattr(compat, name), name
        assert name not in dir(moefy) and name not in moefy.__all__
    from moefy import AUX_LOSSES, Router, cv_squared, data, metrics
    assert (Router, cv_squared, AUX_LOSSES, data, metrics) == tuple(getattr(compat, n) for n in compat.TOP_LEVEL)
    assert Router(4, 3)(torch.randn(5, 4))[0].shape == (5, 3)  # (logits, noisy_logits, noise_std, probs)
    assert float(cv_squared(torch.ones(4))) == 0.0
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_the_original_moefys_names():
    assert moefy.viz.display_experts_load is moefy.viz.plot_experts_load
    assert moefy.viz.display_abs_experts_load is moefy.viz.plot_total_load
    from moefy.viz import display_abs_experts_load, display_experts_load
    assert (display_experts_load, display_abs_experts_load) == (compat.display_experts_load,
                                                                compat.display_abs_experts_load)
    assert {"display_experts_load", "display_abs_experts_load"} <= set(moefy.viz.__all__)
    assert compat.ROUTE_ALIASES == {"images": "samples"}
    for old, new in compat.ROUTE_ALIASES.items():
        assert moefy.RoutingConfig(route=old).route == new
        assert moefy.RoutingConfig(route=old) == moefy.RoutingConfig(route=new)


def test_compat_imports_first_in_a_fresh_process():
    """No import cycle whichever of moefy.compat, moefy.viz, moefy.config a program imports first."""
    for first in ("from moefy.compat import display_experts_load as d; import moefy.viz as v; "
                  "assert d is v.plot_experts_load",
                  "import moefy.viz as v; assert v.display_abs_experts_load is v.plot_total_load; import moefy.compat",
                  "from moefy.config import RoutingConfig; assert RoutingConfig(route='images').route == 'samples'"):
        _run(first)


# ------------------------------------------------------------------------------------- README
class CustomMoEBlock(moefy.MoEBlock):
    """The README's subclass: Linear experts."""

    def __init__(self, input_dim, output_dim, num_experts, *args, **kwargs):
        experts = [nn.Linear(input_dim, output_dim) for _ in range(num_experts)]
        super().__init__(input_dim=input_dim, experts=experts, *args, **kwargs)

    def expert_forward(self, expert, x):
        return expert(x)


def test_the_seed_002_call_runs():
    moe = CustomMoEBlock(k=1, num_experts=3, input_dim=4, output_dim=5, expert_choice=False, hole=True,
                         noise='gumbel', aux_criterion='entropy', aggregation='sum', layer_id=0)
    y = moe(torch.randn(8, 16, 4))
    assert tuple(y.shape) == (8, 16, 5) and moe.routing.num_tokens == 128
    (y.square().mean() + moe.aux_loss).backward()
    assert moefy.aux_loss(moe).item() == pytest.approx(moe.aux_loss.item())
    assert moefy.moe_blocks(moe) and tuple(moe.experts_load().shape)[0] == 4  # 3 experts + hole


def test_readme_routing_options_table_is_generated_from_routing_config():
    text = README.read_text(encoding="utf-8")
    assert moefy.RoutingConfig.options_table() in text
    section = text.split("## Routing options\n", 1)[1].split("\n#", 1)[0]
    assert section.count("\n| `") == len(moefy.RoutingConfig.__dataclass_fields__)  # no other table rows there


def test_readme_api_section_lists_every_curated_name_and_the_subpackages():
    text = README.read_text(encoding="utf-8")
    api = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(\w+)", api, flags=re.M)  # one line per name, in moefy.__all__'s order
    assert listed == CURATED, listed
    for sub in ("routing", "dispatch", "convert", "hf", "compress", "observe", "parallel", "recipes", "viz", "compat"):
        assert f"`moefy.{sub}`" in api, sub
    assert text.index("## Routing options") < text.index("\n## API\n") < text.index("## moefy(): upcycle")
