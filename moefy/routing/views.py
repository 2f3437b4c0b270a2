"""What a block's last forward routed, as tensors to read or plot: a mixin of :class:`~moefy.block.MoEBlock`."""
from __future__ import annotations

import torch

from .record import Routing


class LastRoutingViews:
    """Views of ``self.routing`` (the last forward's record) for blocks with ``num_columns``, ``route`` and
    ``moe_name``; each raises RuntimeError before the first forward."""

    @property
    def routing_matrix(self) -> torch.Tensor:
        """(T, E') router scores of the last forward."""
        return self._last().probs

    def _last(self) -> Routing:
        if self.routing is None:
            raise RuntimeError(f"{self.moe_name} has not run a forward yet: no routing to show")
        return self.routing

    @torch.no_grad()
    def experts_load(self) -> torch.Tensor:
        """(E', N) long: ``load[e, n]`` = samples whose token at position n went to column e.

        N is the input's second-to-last dim for inputs (B, N, D) and more; 1 for (B, D) inputs and for
        per-sample routing. Rows E, E+1, ... are the null experts (``config.null_columns``), then the hole
        (last) when there is one. Assignments dropped over a token-choice
        capacity are in no row (they count in ``routing.dropped``).
        """
        r = self._last()
        r.counts  # read: the lists then hold only counted assignments (no non-finite tail; see Routing)
        positions = r.tokens_shape[-1] if (self.route == "tokens" and len(r.tokens_shape) > 1) else 1
        load = torch.zeros(self.num_columns, positions, dtype=torch.long, device=r.token_index.device)
        pos = r.token_index % positions
        return load.index_put_((r.expert_index, pos), torch.ones_like(pos), accumulate=True)

    @torch.no_grad()
    def abs_experts_load(self) -> torch.Tensor:
        """(E',) long: tokens each router column received in the last forward."""
        return self._last().count.to("cpu", torch.long, copy=True)
