"""The mixtures ``moefy.json`` records besides moefy's own (:class:`~moefy.convert.mixture.ModuleMixture`,
:class:`~moefy.convert.mixture.AttentionMixture`): a registry this layer owns and a higher layer fills, so that
:mod:`moefy.convert.save` never imports it. :mod:`moefy.hf.from_hf` registers ``HFMoEBlock`` (an HF MoE block
converted again at load); ``import moefy`` imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Type

from torch import nn

from ..config import RoutingConfig


@dataclass(frozen=True)
class RecordedBlock:
    """How ``moefy.json`` records one kind of block and how :func:`moefy.load` builds it again.

    Attributes:
        cls: the block class (its name is the entry's ``class``).
        fields: the entry's own fields and their JSON types (besides ``path``, ``class``, ``config``), e.g.
            ``{"source": str}``: checked before anything is built.
        describe: ``block -> {field: value}``, what :func:`moefy.save` writes.
        convert: ``(model, path, config, num_experts) -> block``: converts ``model.<path>`` in place;
            ``num_experts`` is the number of experts the weights file holds there, checked before any is built.
    """
    cls: Type[nn.Module]
    fields: Dict[str, type]
    describe: Callable[[nn.Module], Dict[str, Any]]
    convert: Callable[[nn.Module, str, RoutingConfig, int], nn.Module]


RECORDED: Dict[str, RecordedBlock] = {}


def register(block: RecordedBlock) -> None:
    """Record blocks of ``block.cls`` in ``moefy.json`` (under its class name) and convert them again at load."""
    if not isinstance(block, RecordedBlock):
        raise TypeError(f"block must be a RecordedBlock, got {type(block).__name__}")
    RECORDED[block.cls.__name__] = block
