"""torch's own transformer layers around a mixture: their fused fast paths read the weights of the very
submodules moefy replaces, so a layer or stack that holds a mixture runs torch's step-by-step path instead.

- ``nn.TransformerEncoderLayer`` in eval (grad off or no parameter requiring grad) calls
  ``torch._transformer_encoder_layer_fwd`` with ``linear1.weight``, ``norm1.eps``, ``self_attn.in_proj_bias``, ...
- ``nn.TransformerEncoder`` in eval with a ``src_key_padding_mask`` reads its first layer's weights and turns the
  batch into a nested tensor for its layers.

A mixture has none of those weights and computes what no fused kernel does. Wherever moefy puts a module into a
model (:func:`moefy`, :func:`moefy_chain`, ``moefy.load``, :func:`unmoefy`), :func:`sync_fast_paths` gives such a
layer or stack a subclass of its torch class whose fast path is off while a mixture is inside it, and torch's
class back when none is left. ``isinstance`` checks, ``state_dict`` keys, pickling and copies are unchanged.

Refused by :func:`check_target`, because torch reads the replaced module's weights on every path, not only the
fast one: ``out_proj`` of an ``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` takes
``out_proj.weight``), and the whole first layer of an ``nn.TransformerEncoder`` / ``nn.TransformerDecoder``
(their forward reads ``layers[0].self_attn.batch_first``).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..block import MoEBlock

__all__ = ["SlowPathTransformerEncoderLayer", "SlowPathTransformerEncoder", "check_target", "sync_fast_paths"]


class SlowPathTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """An ``nn.TransformerEncoderLayer`` holding a mixture: always torch's step-by-step forward."""

    @property
    def activation_relu_or_gelu(self) -> int:
        """0: "the fused kernel cannot compute this layer". torch's ``nn.TransformerEncoder`` reads it when built
        around this layer and then keeps its nested-tensor path off. (The instance keeps torch's own value,
        visible again once the layer is a plain ``nn.TransformerEncoderLayer``.)"""
        return 0

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        """``nn.TransformerEncoderLayer.forward`` without the fast-path branch: src (B, S, D) with
        ``batch_first`` else (S, B, D) → same shape. Masks as torch's: src_mask (S, S) or (B·heads, S, S),
        src_key_padding_mask (B, S), True (or -inf) where a key is ignored."""
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class SlowPathTransformerEncoder(nn.TransformerEncoder):
    """An ``nn.TransformerEncoder`` holding a mixture: never the nested-tensor fast path."""

    @property
    def use_nested_tensor(self) -> bool:
        """False: torch's forward reads this flag (set when the encoder was built) before it reads the first
        layer's weights and packs padded batches into nested tensors. The instance keeps torch's own value."""
        return False


# torch class -> moefy's subclass with the fast path off
SLOW_PATH = {nn.TransformerEncoderLayer: SlowPathTransformerEncoderLayer,
             nn.TransformerEncoder: SlowPathTransformerEncoder}
_TORCH_CLASS = {slow: fast for fast, slow in SLOW_PATH.items()}


def _holds_mixture(module: nn.Module) -> bool:
    return any(isinstance(m, MoEBlock) for m in module.modules())


def check_target(root: nn.Module, path: str) -> None:
    """Raise ValueError if a mixture at ``path`` (dotted, in ``root``) would break a torch layer around it."""
    names = path.split(".")
    parent = root.get_submodule(".".join(names[:-1]))
    if isinstance(parent, nn.MultiheadAttention) and names[-1] == "out_proj":
        attention = ".".join(names[:-1])
        raise ValueError(f"target {path!r}: nn.MultiheadAttention never calls out_proj, it passes "
                         f"out_proj.weight to F.multi_head_attention_forward; moefy the whole attention"
                         f"{f' ({attention!r})' if attention else ''} instead")
    if len(names) >= 2 and names[-1] == "0" and names[-2] == "layers":
        stack = root.get_submodule(".".join(names[:-2]))
        if isinstance(stack, (nn.TransformerEncoder, nn.TransformerDecoder)):
            raise ValueError(f"target {path!r}: {type(stack).__name__} reads layers[0].self_attn.batch_first in "
                             f"every forward, so its first layer cannot be a mixture; moefy parts of it "
                             f"('linear1', 'linear2', 'self_attn') or the layers after it")
    for depth in range(len(names)):
        holder = root.get_submodule(".".join(names[:depth]))
        torch_class = next((c for c in SLOW_PATH if isinstance(holder, c)), None)
        if torch_class is not None and type(holder) not in SLOW_PATH and type(holder) not in _TORCH_CLASS \
                and type(holder).forward is torch_class.forward:
            raise TypeError(f"target {path!r} sits in {type(holder).__name__}, a subclass of "
                            f"nn.{torch_class.__name__} with its fast path, which reads the weights of the module "
                            f"a mixture replaces; moefy switches it off for nn.{torch_class.__name__} itself only: "
                            f"override forward without the fast path, or moefy the whole layer")


def sync_fast_paths(root: nn.Module, path: str) -> None:
    """Every torch layer / stack from ``root`` down to ``path``: moefy's slow-path subclass while it holds a
    mixture, torch's own class otherwise."""
    names = path.split(".") if path else []
    for depth in range(len(names) + 1):
        module = root.get_submodule(".".join(names[:depth]))
        cls = type(module)
        if cls in SLOW_PATH and _holds_mixture(module):
            module.__class__ = SLOW_PATH[cls]
        elif cls in _TORCH_CLASS and not _holds_mixture(module):
            module.__class__ = _TORCH_CLASS[cls]
