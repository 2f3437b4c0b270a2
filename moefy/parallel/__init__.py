"""Expert parallelism over ``torch.distributed``: the experts of a mixture sharded over the ranks of a group.

- ``expert_parallel``: :func:`expert_parallel`, the all-to-all exchanges, :class:`ShardedExperts`,
  :class:`ExpertParallel`, :func:`gather_routing`.
- ``checkpoint``: :func:`sharded_names`, :func:`merge_state_dicts`, :func:`full_state_dict`.
"""
from .checkpoint import full_state_dict, merge_state_dicts, sharded_names
from .expert_parallel import AUX_SCOPES, ExpertParallel, ShardedExperts, exchange, expert_parallel, gather_routing

__all__ = [
    "expert_parallel", "ShardedExperts", "ExpertParallel", "exchange", "gather_routing", "AUX_SCOPES",
    "sharded_names", "merge_state_dicts", "full_state_dict",
]
