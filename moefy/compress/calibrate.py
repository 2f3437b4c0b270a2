"""One pass over calibration data that records, per MoE block, what each expert received and returned.

:func:`calibrate` runs the model (eval mode, no grad) on every batch of ``data`` with every MoEBlock's experts
observed at the execution seam (:mod:`moefy.dispatch.experts`): the rows each expert ran on, its outputs f_j(x),
and the combine weight g_j(x) of each assignment, as the block computed them (fused, looped or the family's own
stacked math). Nothing is changed: the model's outputs are those of a plain forward.

Shapes: E experts of a block, A assignments in one forward, F_out an expert's output features (flattened).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..block import MoEBlock

logger = logging.getLogger(__name__)

__all__ = ["ExpertStats", "calibrate", "named_blocks", "run_batch"]


@dataclass
class ExpertStats:
    """What one block's E experts received over the calibration data (float64 sums, on the CPU); g_j(x) is the
    weight the block's combine applies (the record's combine weight, divided by the token's number of real experts
    with ``aggregation="mean"``).

    Attributes:
        tokens: routed tokens (finite, not masked) the block's router scored.
        frequency: (E,) assignments each expert ran (token slots routed to it, after capacity drops).
        soft: (E,) sum of its router probabilities (the record's ``probs``) over the routed tokens.
        weighted_norm: (E,) sum over its assignments of g_j(x)·‖f_j(x)‖₂.
        norm: (E,) sum over its assignments of ‖f_j(x)‖₂.
        output_sum: (E, F_out) sum over every routed token x of f_j(x), every expert run on every token (HC-SMoE's
            expert features); None unless asked for.
    """

    tokens: int
    frequency: torch.Tensor
    soft: torch.Tensor
    weighted_norm: torch.Tensor
    norm: torch.Tensor
    output_sum: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, num_experts: int) -> "ExpertStats":
        zeros = lambda: torch.zeros(num_experts, dtype=torch.float64)  # noqa: E731
        return cls(0, zeros(), zeros(), zeros(), zeros())


def named_blocks(model: nn.Module) -> Dict[str, MoEBlock]:
    """``{name: block}`` of every MoEBlock of ``model`` (outermost only: a block inside another block's experts
    is part of that expert), in module order; ValueError if there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks: Dict[str, MoEBlock] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoEBlock) and not any(name.startswith(b + ".") or b == "" for b in blocks):
            blocks[name] = m
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no MoE block (moefy it, or import it with "
                         f"moefy.hf.from_hf, first)")
    return blocks


def run_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` on one item of calibration data: a tensor as ``model(batch)``, a mapping as ``model(**batch)``
    (a tokenizer's output), a tuple or list as ``model(*batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _Observer:
    """Adds one block's forwards to its :class:`ExpertStats` by wrapping the block's ``dispatch`` and its
    execution seam (instance attributes, removed by :meth:`close`)."""

    def __init__(self, block: MoEBlock, stats: ExpertStats, outputs: bool):
        self.block, self.stats, self.outputs = block, stats, outputs
        self.seam_calls = 0
        self.dispatch, self.execution = block.dispatch, block._execution  # the class's, bound
        block.__dict__.update(dispatch=self._dispatch, _execution=self._execution)

    def close(self) -> None:
        for name in ("dispatch", "_execution"):
            self.block.__dict__.pop(name, None)

    def _execution(self, rows: torch.Tensor, side_inputs: bool):
        seam = self.execution(rows, side_inputs)

        def observed(rows_a, token_index, routing, run_expert):
            self.seam_calls += 1
            out = seam(rows_a, token_index, routing, run_expert)        # (A, *F_out)
            self._add_assignments(out, routing)
            return out
        return observed

    def _dispatch(self, rows: torch.Tensor, routing, run_expert=None) -> torch.Tensor:
        calls = self.seam_calls
        y = self.dispatch(rows, routing, run_expert)
        if self.seam_calls == calls:  # a dispatch override that runs the experts itself: its outputs are unseen
            raise ValueError(f"{self.block.moe_name}: {type(self.block).__name__}.dispatch runs its experts without "
                             f"moefy's execution seam (block._execution), so moefy.compress cannot see their outputs")
        self._add_tokens(rows, routing, run_expert)
        return y

    def _add_assignments(self, out: torch.Tensor, routing) -> None:
        E = self.block.num_experts
        counts = routing.counts                                         # host ints; cuts non-finite tails
        assigned = sum(counts[:E])
        expert = routing.expert_index[:assigned].cpu()                  # (A,)
        norms = out[:assigned].detach().reshape(assigned, -1).double().norm(dim=1).cpu()  # (A,) ‖f_j(x)‖₂
        weight = routing.weight[:assigned].detach().double().cpu()      # (A,) g_j(x)
        if self.block.config.aggregation == "mean":  # what combine applies: divided by the token's real experts
            token = routing.token_index[:assigned].cpu()
            weight = weight / torch.bincount(token).index_select(0, token).double()
        s = self.stats
        s.frequency += torch.tensor(counts[:E], dtype=torch.float64)
        s.norm.index_add_(0, expert, norms)
        s.weighted_norm.index_add_(0, expert, weight * norms)

    def _add_tokens(self, rows: torch.Tensor, routing, run_expert) -> None:
        E, s = self.block.num_experts, self.stats
        finite = routing.finite                                         # (T_routed,) or None
        probs = routing.probs[:, :E].detach().double()                  # (T_routed, E)
        if finite is not None:
            probs = probs[finite]
        s.tokens += probs.shape[0]
        s.soft += probs.sum(0).cpu()
        if not self.outputs:
            return
        ids = routing.kept if routing.kept is not None else torch.arange(rows.shape[0], device=rows.device)
        if finite is not None:
            ids = ids[finite]
        x = rows.index_select(0, ids)                                   # (T, *F) every routed token
        run = run_expert or self.block._run_expert
        outs = torch.stack([run(e, x, ids).detach().reshape(x.shape[0], -1).double().sum(0).cpu()
                            for e in range(E)])                         # (E, F_out)
        s.output_sum = outs if s.output_sum is None else s.output_sum + outs


@contextlib.contextmanager
def _observing(blocks: Dict[str, MoEBlock], stats: Dict[str, ExpertStats], outputs: bool) -> Iterator[None]:
    observers = [_Observer(b, stats[n], outputs) for n, b in blocks.items()]
    try:
        yield
    finally:
        for o in observers:
            o.close()


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable[Any], outputs: bool = False) -> Dict[str, ExpertStats]:
    """Run ``model`` in eval mode on every item of ``data`` (see :func:`run_batch`) and return each MoE block's
    :class:`ExpertStats`, ``{block name: stats}``; ``outputs`` also runs every expert on every routed token
    (``output_sum``, E times the experts' work). The model's train / eval flags are restored.

    Raises ValueError when the model has no MoE block, ``data`` is empty, or no batch reached any block."""
    blocks = named_blocks(model)
    if isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of model inputs (a list of batches, a DataLoader), got "
                        f"{type(data).__name__}; wrap one batch in a list: data=[batch]")
    stats = {n: ExpertStats.empty(b.num_experts) for n, b in blocks.items()}
    modes = {m: m.training for m in model.modules()}
    batches = 0
    try:
        model.eval()
        with _observing(blocks, stats, outputs):
            for batch in data:
                run_batch(model, batch)
                batches += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    if batches == 0:
        raise ValueError("data: no batch to calibrate on (an empty iterable)")
    unreached = [name for name, s in stats.items() if s.tokens == 0]
    if len(unreached) == len(stats):
        raise ValueError(f"data: {batches} batches reached no MoE block of the model (blocks: {list(blocks)}); pass "
                         f"inputs that the model's forward routes through its mixtures")
    if unreached:
        logger.warning("moefy.compress: the calibration data reached no token of blocks %s: their experts score 0",
                       unreached)
    return stats
