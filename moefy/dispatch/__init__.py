"""Dispatch: tokens to their experts and the weighted outputs back into token order.

- ``combine``: sort-based sparse dispatch (:func:`dispatch_combine`), the weighted :func:`combine`, checks.
- ``fused``: homogeneous experts run as one pass per layer (grouped mm or a loop of matmuls).
"""
from .combine import AGGREGATIONS, check_expert_output, combine, dispatch_combine, zero_grad_path
from .fused import BACKENDS, ELEMENTWISE, Layout, fused_experts_forward, fused_layout, runs_grouped

__all__ = [
    "dispatch_combine", "combine", "check_expert_output", "zero_grad_path", "AGGREGATIONS",
    "fused_layout", "fused_experts_forward", "runs_grouped", "Layout", "ELEMENTWISE", "BACKENDS",
]
