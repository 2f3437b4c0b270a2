"""Expert parallelism over ``torch.distributed``: the experts of a mixture sharded over the ranks of a group.

- ``expert_parallel``: :func:`expert_parallel`, the all-to-all exchanges, :class:`ShardedExperts`,
  :class:`ExpertParallelExperts` (the execution seam over ranks), :func:`gather_routing`.
- ``checkpoint``: :func:`sharded_names`, :func:`sharded_params`, :func:`merge_state_dicts`,
  :func:`full_state_dict`.
"""
from .checkpoint import full_state_dict, merge_state_dicts, sharded_names, sharded_params
from .expert_parallel import AUX_SCOPES, ExpertParallelExperts, ShardedExperts, exchange, expert_parallel, gather_routing

__all__ = [
    "expert_parallel", "ShardedExperts", "ExpertParallelExperts", "exchange", "gather_routing", "AUX_SCOPES",
    "sharded_names", "sharded_params", "merge_state_dicts", "full_state_dict",
]
