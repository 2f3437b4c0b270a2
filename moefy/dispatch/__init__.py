"""Dispatch: tokens to their experts and the weighted outputs back into token order.

- ``rows``: an input as router rows (per token or per sample), padding masks, per-row side inputs.
- ``combine``: :func:`dispatch` = gather → experts → :func:`combine` (the weighted ``index_add_`` back).
- ``shared``: :func:`add_shared`, always-on shared experts added to the routed mixture (DeepSeek-V3, Qwen2-MoE).
- ``null``: :func:`add_null`, MoE++'s copy and constant null experts (:class:`ConstantExperts`) added to the mixture.
- ``experts``: the expert-execution seam and two of its implementations (a loop over expert modules, fused).
- ``fused``: homogeneous experts as one pass per layer (grouped mm or a loop of matmuls).
"""
from .combine import AGGREGATIONS, combine, dispatch
from .experts import FusedExperts, LoopedExperts, check_expert_output, run_slices, zero_grad_path
from .shared import add_shared
from .null import ConstantExperts, add_null
from .fused import BACKENDS, ELEMENTWISE, Layout, fused_experts_forward, fused_layout, runs_grouped

__all__ = [
    "dispatch", "combine", "AGGREGATIONS", "add_shared", "add_null", "ConstantExperts",
    "LoopedExperts", "FusedExperts", "run_slices", "check_expert_output", "zero_grad_path",
    "fused_layout", "fused_experts_forward", "runs_grouped", "Layout", "ELEMENTWISE", "BACKENDS",
]
