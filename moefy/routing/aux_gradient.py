"""Aux losses that reach the gradient when the forward that computed them kept no graph.

A block keeps its aux loss on ``block.aux_loss`` for the training loop to add: ``loss = task + moefy.aux_loss(model)``.
That loss is part of the autograd graph only if the forward built one. Reentrant activation checkpointing
(``torch.utils.checkpoint(..., use_reentrant=True)``, HF's ``gradient_checkpointing_enable`` with
``use_reentrant=True``) runs the first forward under ``no_grad`` and builds the graph again during ``backward()``:
the aux loss the loop adds is a constant, and the router would train without its balance term, silently.

The fix, after Megatron-Core's ``MoEAuxLossAutoScaler``, attaches the aux loss's gradient to the block's output
in the recomputed forward, so the backward that reaches the output carries it. Unlike Megatron's fixed scale, the
scale is what the training loop's loss gives the aux term, read from the loss itself:

1. a training forward without a graph keeps, as ``block.aux_loss``, a **probe**: the loss's value, requiring
   grad; its backward records the gradient ``g`` it receives (1 for ``task + aux``, ``1/n`` for ``(task + aux) / n``,
   the loss scale under a ``GradScaler``, nothing if the loop never adds it);
2. the recomputed forward (the same block, inside that ``backward()``) attaches its differentiable aux loss to
   its output with :class:`AuxGradient`, whose backward sends ``g`` to the aux loss.

So the same loop trains the same gradient with and without checkpointing, and no term counts twice: the probe
itself sends nothing further. The probe runs first: it sits next to the loss, the recomputation deep in the graph.
A probe that received a gradient no recomputation used (a ``no_grad`` training forward whose aux loss was
backpropagated directly) logs a warning at the end of that backward: its gradient is lost.
"""
from __future__ import annotations

import logging
import weakref
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)


def _graph_task() -> int:
    """The id of the backward pass running on this thread (-1 outside one)."""
    return torch._C._current_graph_task_id()


class PendingAux:
    """One aux loss computed without a graph, waiting for its recomputation: ``scale`` is the gradient its
    probe received (None before), ``task`` the backward pass that gave it."""

    def __init__(self, owner: str):
        self.owner, self.scale, self.task, self.used = owner, None, -1, False


class _Probe(torch.autograd.Function):
    """``value`` as a tensor that requires grad; its backward keeps the incoming gradient in ``pending``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, leaf: torch.Tensor, pending: PendingAux) -> torch.Tensor:
        ctx.pending = pending
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pending = ctx.pending
        pending.scale, pending.task, pending.used = grad.detach(), _graph_task(), False
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _warn_if_unused(pending))
        return None, None, None


def _warn_if_unused(pending: PendingAux) -> None:
    if not pending.used:
        logger.warning("%s: the aux loss of a forward run without a graph (torch.no_grad in training mode) was "
                       "backpropagated, but no recomputation of that forward ran in this backward: its gradient "
                       "does not reach the router. Run the forward with gradients, or under activation "
                       "checkpointing.", pending.owner)


class AuxGradient(torch.autograd.Function):
    """Identity on ``output``; its backward also sends ``scale`` to ``aux_loss`` (Megatron-Core's
    ``MoEAuxLossAutoScaler``, with the scale the training loss gave the aux term)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return output.clone()  # not a view: callers may modify the block's output in place

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad_output, scale.to(ctx.aux_dtype).expand(ctx.aux_shape), None


class DeferredAuxLosses:
    """A block's aux losses computed without a graph, until a recomputation in a backward pass uses them."""

    def __init__(self):
        self._pending: List[weakref.ref] = []

    def probe(self, aux_loss: torch.Tensor, owner: str) -> torch.Tensor:
        """``aux_loss`` (a scalar without graph) as a probe that requires grad (see the module docstring)."""
        pending = PendingAux(owner)
        self._pending = [r for r in self._pending if r() is not None and not r().used]
        self._pending.append(weakref.ref(pending))
        leaf = torch.zeros((), device=aux_loss.device, requires_grad=True)
        with torch.enable_grad():
            return _Probe.apply(aux_loss.detach(), leaf, pending)

    def attach(self, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        """In a recomputation inside a backward pass: ``output`` carrying the gradient that this backward's probe
        gave the aux loss (the earliest probe of this backward not yet used); unchanged otherwise."""
        task = _graph_task()
        if task < 0 or not self._pending or not aux_loss.requires_grad:
            return output
        pending = self._take(task)
        if pending is None:
            return output
        pending.used = True
        return AuxGradient.apply(output, aux_loss, pending.scale.to(aux_loss.device))

    def _take(self, task: int) -> Optional[PendingAux]:
        for ref in self._pending:
            pending = ref()
            if pending is not None and not pending.used and pending.scale is not None and pending.task == task:
                return pending
        return None
