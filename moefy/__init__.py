"""moefy: turn any PyTorch module into a Mixture of Experts, and see what the router does."""
from . import data
from .block import MoEBlock, aux_loss, moe_blocks
from .convert import (AttentionMixture, ModuleMixture, load_dense_state_dict, merge, moefy, moefy_chain,
                      unmoefy)
from .observe import RoutingRecorder, TrainingLogWriter, read_log
from .parallel import expert_parallel, full_state_dict, merge_state_dicts, sharded_names
from .recipes import MoE, metrics, mode_loss, mutual_distillation_loss
from .routing import AUX_LOSSES, Router, Routing, cv_squared

__all__ = [
    "MoEBlock", "Routing", "Router", "aux_loss", "moe_blocks", "AUX_LOSSES", "cv_squared",
    "moefy", "merge", "unmoefy", "moefy_chain", "load_dense_state_dict", "ModuleMixture", "AttentionMixture",
    "MoE", "mutual_distillation_loss", "mode_loss",
    "expert_parallel", "full_state_dict", "merge_state_dicts", "sharded_names",
    "RoutingRecorder", "TrainingLogWriter", "read_log", "data", "metrics",
]
__version__ = "0.1.0"
