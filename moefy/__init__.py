"""moefy: turn any PyTorch module into a Mixture of Experts, and see what the router does.

The top level is the curated API (README, "API"); everything else lives in the subpackages ``moefy.routing``,
``moefy.dispatch``, ``moefy.convert``, ``moefy.hf``, ``moefy.observe``, ``moefy.parallel``, ``moefy.recipes``, ``moefy.viz``,
and the names of moefy 0.1 and of the original MoEfy in ``moefy.compat``.
"""
from importlib import import_module as _import_module

# the block: subclass it with your experts; its routing options, its routing record, the aux loss of a model
from .block import MoEBlock, aux_loss, moe_blocks
from .config import RoutingConfig
from .routing import Routing
# upcycling: copies of a module (or of chosen submodules of a model) as a mixture, and back to dense
from .convert import (AttentionMixture, ModuleMixture, load_dense_state_dict, merge, moefy, moefy_chain,
                      unmoefy)
# saving: a moefied model's weights and conversions, and re-applying them to a fresh dense model; moefy.hf (imported
# on first use): HF MoE models in (from_hf) and out (export)
from .convert.save import load, save
from .hf import from_hf as _from_hf  # noqa: F401 (registers HFMoEBlock with save / load; no transformers)
# observing: routing statistics, the JSON-lines training log, and the plots (viz is imported on first use)
from .observe import LogFormatError, RoutingRecorder, TrainingLogWriter, read_log
# parallel: experts sharded over the ranks of a process group, and their checkpoints
from .parallel import expert_parallel, full_state_dict, merge_state_dicts, sharded_names
# recipes: seed 000's ready-made MoE layer, and mutual distillation between experts
from .recipes import MoE, block_distillation_loss, mode_loss, mutual_distillation_loss
# old import paths: `from moefy.moefy import MoEBlock` (the original MoEfy) and `import moefy.metrics` (0.1), as
# sys.modules entries, so that the attribute moefy.moefy stays the function above
from ._import_paths import register as _register_import_paths

_register_import_paths(__name__)

__all__ = [
    "MoEBlock", "RoutingConfig", "Routing", "aux_loss", "moe_blocks",
    "moefy", "moefy_chain", "merge", "unmoefy", "load_dense_state_dict", "ModuleMixture", "AttentionMixture",
    "save", "load", "hf", "compress",
    "RoutingRecorder", "TrainingLogWriter", "read_log", "LogFormatError", "viz",
    "expert_parallel", "sharded_names", "merge_state_dicts", "full_state_dict",
    "MoE", "mutual_distillation_loss", "mode_loss", "block_distillation_loss",
]
__version__ = "0.1.0"

_LAZY_SUBMODULES = ("viz", "compat", "hf", "compress")  # viz loads matplotlib, hf transformers: ``import moefy`` needs neither
_OLD_NAMES = ("Router", "cv_squared", "AUX_LOSSES", "data", "metrics")  # moefy 0.1's, = moefy.compat.TOP_LEVEL


def __getattr__(name):
    """``moefy.viz`` / ``moefy.compat`` on first use, and moefy 0.1's top-level names from :mod:`moefy.compat`
    (without a warning: they are kept, not scheduled for removal)."""
    if name in _LAZY_SUBMODULES:
        return _import_module(f"{__name__}.{name}")  # the import binds it here: __getattr__ runs once per name
    if name in _OLD_NAMES:
        return getattr(_import_module(f"{__name__}.compat"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
