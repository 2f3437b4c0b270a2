"""The record of what the router decided: :class:`Routing`.

Shapes: T tokens (or samples, with per-sample routing), D features, E experts, E' router columns: the E
real experts, then the null experts (``null_columns``: copy, constant, zero, in that order), then the hole
(the last column, with ``hole``), k experts per token, C tokens per expert (expert choice),
A = number of (token, expert) assignments.

Non-finite tokens (a NaN or ±inf among a token's router logits or scores, e.g. from a NaN in its input or in
the router's weights) are routed nowhere and counted, never raised about: raising would need the device's
answer on the host every forward. Such a token takes no place and no capacity from another, its k slots
(token choice) count in ``dropped`` and in no column, ``finite`` marks it, its output is NaN (as a dense
layer's would be: the loss shows it; moefy does not turn it into a clean-looking zero), and the aux losses and
statistics are those of the finite tokens. The selection strategies (:mod:`moefy.routing.select`) decide it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .select import Selection


@dataclass(frozen=True, eq=False)
class Routing:
    """What the router decided in one forward. Read by dispatch, aux losses, statistics and plots.

    Attributes:
        mode: ``"token_choice"`` or ``"expert_choice"``.
        num_experts: E, real experts (the hole is not one of them).
        hole: whether the last router column (E without null experts) is a hole expert.
        logits: (T, E') clean router logits, float32.
        noisy_logits: (T, E') logits after training noise (the same tensor as ``logits`` without noise).
        noise_std: (T, E') learned Gaussian noise std, or None.
        probs: (T, E') scores that selection used: softmax (or sigmoid) of ``noisy_logits / temperature``.
        indices: token choice: (T, k) chosen router columns per token, best first (E' - 1 = hole), as picked:
            before capacity drops; expert choice: (E', C) chosen token ids per column.
        weights: same shape as ``indices``: the combine weight of each choice.
        token_index: (A,) token id of each assignment, grouped by column in column order. Assignments
            dropped over a token-choice capacity are not listed.
        expert_index: (A,) router column of each assignment, non-decreasing.
        weight: (A,) combine weight of each assignment.
        count: (E',) long, assignments per router column (``count[-1]`` is the hole's), on the routing's device.
        tokens_shape: leading shape of the routed input, ``prod(tokens_shape) == T``.
        dropped: 0-dim long tensor; token choice: slots sent to the hole plus slots over a real expert's
            capacity (``token_capacity_factor``) plus the k slots of each non-finite token; expert choice:
            tokens that no real expert picked, and the non-finite ones. Every token slot is either processed
            or counted here.
        host_counts: ``count`` as host ints when the router already has them; else read back on first use of
            :attr:`counts` (on a GPU that read is the forward's one synchronisation, and a fused grouped-mm
            forward never makes it).
        kept: (T,) long, the input token id of each routed row when some tokens were masked out
            (``token_mask``); None when row t is input token t.
        null_columns: the kind (``"copy"``, ``"constant"``, ``"zero"``) of router columns E, E+1, ... (MoE++'s
            null experts, before the hole); () without them. Zero slots count in ``dropped``; copy and
            constant slots in :attr:`null_slots`, so for token choice
            ``sum(load) + null_slots + dropped == T·k``.
        count_before_drops: (E',) the picks per column before a token-choice capacity dropped some; None
            when nothing was capped (read it as :attr:`picked_count`).
        finite: (T,) bool, False for the non-finite tokens, routed nowhere (see the module docstring); None:
            not checked (every token routed). Their token-choice rows of ``indices`` are placeholders, with
            NaN ``weights``; they are in no count, and their slots count in ``dropped``.

    The lists ``token_index`` / ``expert_index`` / ``weight`` hold the ``sum(counts)`` counted assignments.
    Only while ``host_counts`` is None (an accelerator, before anything read the counts) may they go on with
    the slots of non-finite tokens, listed under the last column: a fused grouped-mm forward runs them, with
    their NaN weights, into their own tokens' outputs only, and needs no synchronisation. Reading
    :attr:`counts` cuts them off.
    """

    mode: str
    num_experts: int
    hole: bool
    logits: torch.Tensor
    noisy_logits: torch.Tensor
    noise_std: Optional[torch.Tensor]
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    tokens_shape: Tuple[int, ...]
    dropped: torch.Tensor
    host_counts: Optional[Tuple[int, ...]] = field(default=None, repr=False)
    kept: Optional[torch.Tensor] = field(default=None, repr=False)
    null_columns: Tuple[str, ...] = ()
    count_before_drops: Optional[torch.Tensor] = field(default=None, repr=False)
    finite: Optional[torch.Tensor] = field(default=None, repr=False)

    def __repr__(self) -> str:
        bad = self.num_nonfinite
        return (f"Routing({self.mode}, tokens={self.num_tokens}, experts={self.num_experts}, hole={self.hole}, "
                f"counts={list(self.counts)}, dropped={int(self.dropped)}"
                + (f", null={self.null_columns}, null_slots={self.null_slots}" if self.null_columns else "")
                + (f", nonfinite={bad})" if bad else ")"))

    @property
    def counts(self) -> Tuple[int, ...]:
        """E' host ints, assignments per router column (``counts[-1]`` is the hole's)."""
        if self.host_counts is None:
            object.__setattr__(self, "host_counts", tuple(self.count.tolist()))  # a cache, not a new value
            self._cut_lists()
        return self.host_counts

    def _cut_lists(self) -> None:
        """Drop the non-finite tokens' slots listed behind the counted assignments (see the class docstring);
        the counted ones are unchanged."""
        n = sum(self.host_counts)
        if self.token_index.shape[0] > n:
            for name in ("token_index", "expert_index", "weight"):
                object.__setattr__(self, name, getattr(self, name)[:n])

    @property
    def num_nonfinite(self) -> int:
        """Tokens routed nowhere because a router score was not finite (a host read)."""
        return 0 if self.finite is None else int((~self.finite).sum())

    def nonfinite_inputs(self) -> Optional[torch.Tensor]:
        """(``num_inputs``,) bool, True for the input tokens routed nowhere for a non-finite score (masked-out
        tokens are False); None when not checked. On the device, without synchronisation."""
        if self.finite is None:
            return None
        if self.kept is None:
            return ~self.finite
        bad = torch.zeros(self.num_inputs, dtype=torch.bool, device=self.finite.device)
        return bad.index_put_((self.kept,), ~self.finite)

    @property
    def num_tokens(self) -> int:
        """T: tokens routed (masked-out padding excluded)."""
        return self.logits.shape[0]

    @property
    def num_inputs(self) -> int:
        """Tokens in the input, ``prod(tokens_shape)``; token ids in the record index these."""
        return math.prod(self.tokens_shape)

    @property
    def load(self) -> torch.Tensor:
        """(E,) long: tokens each real expert processed."""
        return torch.tensor(self.counts[: self.num_experts], dtype=torch.long)

    @property
    def picked_count(self) -> torch.Tensor:
        """(E',) long, on the device: assignments per router column as the router picked them, before
        capacity drops (token choice: the columns in ``indices``, hole included; expert choice: ``count``).
        Equal to ``count`` without a token-choice capacity."""
        return self.count if self.count_before_drops is None else self.count_before_drops

    @property
    def null_counts(self) -> Tuple[int, ...]:
        """Host ints, assignments per null column (``null_columns`` order; the hole's is ``counts[-1]``)."""
        return self.counts[self.num_experts: self.num_experts + len(self.null_columns)]

    @property
    def num_computed_null(self) -> int:
        """Null columns whose slots contribute (copy and constant): the first ones of ``null_columns``."""
        return sum(kind != "zero" for kind in self.null_columns)

    @property
    def null_slots(self) -> int:
        """Slots sent to a copy or constant null expert: they contribute ``w·x`` / ``w·(α1·x + α2·v)`` and
        are not dropped (zero null experts' slots are in ``dropped``)."""
        return sum(self.null_counts[: self.num_computed_null])

    @property
    def num_assigned(self) -> int:
        """A: assignments that reach a real expert, ``sum(load)``; they come first in ``token_index``, the
        null experts' and the hole's are the tail (capacity drops are not listed at all). Without a hole or
        null experts that is every listed assignment, known without reading counts (on an accelerator the
        non-finite tokens' slots too, if any are still listed: see the class docstring)."""
        if not self.hole and not self.null_columns:
            return self.token_index.shape[0]
        return sum(self.counts[: self.num_experts])

    @classmethod
    def build(cls, scores: Sequence[Optional[torch.Tensor]], picked: "Selection", num_experts: int, hole: bool,
              tokens_shape: Optional[Tuple[int, ...]] = None, kept: Optional[torch.Tensor] = None,
              null_columns: Tuple[str, ...] = ()) -> "Routing":
        """The record of one forward, from the router's ``scores`` = (logits, noisy_logits, noise_std, probs)
        and a strategy's selection (:mod:`moefy.routing.select`). ``kept`` (T,) maps the T routed rows to
        their ids among all input tokens when some were masked out, so the record's token ids index the input."""
        logits, noisy, std, probs = scores
        token_index, indices = picked.token_index, picked.indices
        if kept is not None:
            token_index = kept.index_select(0, token_index)
            if picked.mode == "expert_choice":  # its indices are token ids too
                indices = kept[indices]
        routing = cls(mode=picked.mode, num_experts=num_experts, hole=hole, logits=logits, noisy_logits=noisy,
                      noise_std=std, probs=probs, indices=indices, weights=picked.weights, token_index=token_index,
                      expert_index=picked.expert_index, weight=picked.weight, count=picked.count,
                      tokens_shape=tuple(tokens_shape if tokens_shape is not None else (logits.shape[0],)),
                      dropped=picked.dropped, host_counts=picked.host_counts, kept=kept,
                      null_columns=tuple(null_columns), count_before_drops=picked.picked_count,
                      finite=picked.finite)
        if routing.host_counts is not None:
            routing._cut_lists()
        return routing
