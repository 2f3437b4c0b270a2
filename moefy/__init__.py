"""moefy: turn any PyTorch module into a Mixture of Experts, and see what the router does."""
from . import data
from .block import MoEBlock, aux_loss, moe_blocks
from .convert.mixture import (AttentionMixture, ModuleMixture, load_dense_state_dict, merge, moefy, moefy_chain,
                              unmoefy)
from .observe.log import TrainingLogWriter, read_log
from .observe.recorder import RoutingRecorder
from .parallel.expert_parallel import expert_parallel, full_state_dict, merge_state_dicts, sharded_names
from .recipes import metrics
from .recipes.distill import mode_loss, mutual_distillation_loss
from .recipes.sparse_moe import MoE
from .routing.losses import AUX_LOSSES, cv_squared
from .routing.record import Router, Routing

__all__ = [
    "MoEBlock", "Routing", "Router", "aux_loss", "moe_blocks", "AUX_LOSSES", "cv_squared",
    "moefy", "merge", "unmoefy", "moefy_chain", "load_dense_state_dict", "ModuleMixture", "AttentionMixture",
    "MoE", "mutual_distillation_loss", "mode_loss",
    "expert_parallel", "full_state_dict", "merge_state_dicts", "sharded_names",
    "RoutingRecorder", "TrainingLogWriter", "read_log", "data", "metrics",
]
__version__ = "0.1.0"
