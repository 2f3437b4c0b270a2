"""moefy: turn any PyTorch module into a Mixture of Experts, and see what the router does."""
from . import data, metrics
from .block import MoEBlock, aux_loss, moe_blocks
from .convert import (AttentionMixture, ModuleMixture, load_dense_state_dict, merge, moefy, moefy_chain,
                      unmoefy)
from .distill import mode_loss, mutual_distillation_loss
from .distributed import expert_parallel, full_state_dict, merge_state_dicts, sharded_names
from .log import TrainingLogWriter, read_log
from .losses import AUX_LOSSES, cv_squared
from .routing import Router, Routing
from .sparse_moe import MoE
from .stats import RoutingRecorder

__all__ = [
    "MoEBlock", "Routing", "Router", "aux_loss", "moe_blocks", "AUX_LOSSES", "cv_squared",
    "moefy", "merge", "unmoefy", "moefy_chain", "load_dense_state_dict", "ModuleMixture", "AttentionMixture",
    "MoE", "mutual_distillation_loss", "mode_loss",
    "expert_parallel", "full_state_dict", "merge_state_dicts", "sharded_names",
    "RoutingRecorder", "TrainingLogWriter", "read_log", "data", "metrics",
]
__version__ = "0.1.0"
