"""The mixtures ``moefy.json`` records besides moefy's own (:class:`~moefy.convert.mixture.ModuleMixture`,
:class:`~moefy.convert.mixture.AttentionMixture`): a registry this layer owns and a higher layer fills, so that
:mod:`moefy.convert.save` never imports it. :mod:`moefy.hf.from_hf` registers ``HFMoEBlock`` (an HF MoE block
converted again at load) and ``HFExpertsBlock`` (a family's experts module, its router kept); ``import moefy``
imports it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type

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
        convert: ``(model, path, config, num_experts, fields) -> block``: converts ``model.<path>`` in place;
            ``num_experts`` is the number of experts the weights file holds there, checked before any is built;
            ``fields`` the entry's checked fields. Raises :class:`EntryMismatch` naming the field the base model
            does not match.
        choices: ``{field: allowed values}`` for fields with a few values (checked with the types).
        stacked: None: the weights hold ``<path>.router.gate.weight`` and ``<path>.experts.<i>.*`` (one module per
            expert). A submodule name: the block has no router of its own (the family's routes) and its experts'
            weights are stacked under ``<path>.<stacked>.``: each of those tensors has a multiple of the entry's
            ``num_experts`` field rows (E rows; DBRX's E · ffn).
        save_pretrained: ``model -> None``: what ``model.save_pretrained`` writes once loaded (the layout the
            conversion that made such blocks gave it); None: :func:`~moefy.convert.writer.keep_save_pretrained`,
            moefy.save's format.
    """
    cls: Type[nn.Module]
    fields: Dict[str, type]
    describe: Callable[[nn.Module], Dict[str, Any]]
    convert: Callable[[nn.Module, str, RoutingConfig, int, Dict[str, Any]], nn.Module]
    choices: Dict[str, Tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    stacked: Optional[str] = None
    save_pretrained: Optional[Callable[[nn.Module], None]] = None


class EntryMismatch(ValueError):
    """Raised by a :attr:`RecordedBlock.convert` where the base model does not match the entry's ``field``: the
    loader names ``moefy.json`` and the entry's field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


RECORDED: Dict[str, RecordedBlock] = {}


def register(block: RecordedBlock) -> None:
    """Record blocks of ``block.cls`` in ``moefy.json`` (under its class name) and convert them again at load."""
    if not isinstance(block, RecordedBlock):
        raise TypeError(f"block must be a RecordedBlock, got {type(block).__name__}")
    RECORDED[block.cls.__name__] = block
