"""include_aux_loss(): a moefied transformers model whose ``outputs.loss`` includes moefy's aux losses, as an HF
MoE model's includes its router loss, so ``transformers.Trainer`` (which backpropagates ``outputs.loss``) trains
the routers' balance without a custom ``compute_loss``."""
from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..block import aux_loss, moe_blocks


def _add_aux_loss(model: nn.Module, args, kwargs, output):
    loss = getattr(output, "loss", None)
    if loss is not None:
        output.loss = loss + aux_loss(model).to(loss.dtype)
    return output


def include_aux_loss(model: nn.Module) -> RemovableHandle:
    """From now on ``model(..., labels=...).loss`` is the task loss plus :func:`moefy.aux_loss` of that forward
    (every block's weighted aux losses: set them with ``aux_criterion``). Outputs without a ``loss`` pass unchanged.

    Returns:
        the hook's handle: ``handle.remove()`` restores the plain loss.
    Raises:
        ValueError: ``model`` has no moefy block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not moe_blocks(model):
        raise ValueError(f"model: {type(model).__name__} has no moefy block; moefy it (or moefy.hf.from_hf) first")
    return model.register_forward_hook(_add_aux_loss, with_kwargs=True)
