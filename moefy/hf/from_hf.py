"""from_hf(): the MoE blocks of a transformers model as moefy blocks, in place, with the same weights and the same
outputs: the families of :data:`~moefy.hf.families.FAMILIES` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE,
...) with their routing mapped onto RoutingConfig, every other family with an experts call through
:mod:`moefy.hf.generic` (its own router kept).

After it, every moefy tool reads the model: ``block.routing`` after a forward, :class:`~moefy.RoutingRecorder`,
the load plots and heatmaps, the training log and ``moefy plot``, router replay; :func:`moefy.save` /
:func:`moefy.load` keep it, and :func:`moefy.hf.export` writes the original architecture back.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional

import torch
from torch import nn

from ..config import RoutingConfig
from ..convert.recorded import RecordedBlock, register
from ..convert.surgery import _set_submodule
from ..convert.writer import keep_save_pretrained
from .block import HFMoEBlock, unstack_experts
from .families import FAMILIES, MoEFamily, transformers_module
from .generic import (MATHS, HFExpertsBlock, convert_family_at, describe_family_block, import_family,
                      keep_family_layout)

logger = logging.getLogger(__name__)


def _layer_index(path: str, default: int) -> int:
    found = re.findall(r"(?:^|\.)layers\.(\d+)(?:\.|$)", path)
    return int(found[-1]) if found else default


def convert_block(hf_block: nn.Module, family: MoEFamily, config, routing: RoutingConfig,
                  num_experts: Optional[int] = None) -> HFMoEBlock:
    """One HF MoE block → an :class:`HFMoEBlock` routing by ``routing``, with its weights (copied), on its device
    and dtype. ``num_experts``: only the first that many of its experts (a layer :mod:`moefy.compress` made smaller
    than the config says, whose weights are loaded next); default all."""
    gate_up, down = hf_block.experts.gate_up_proj, hf_block.experts.down_proj  # (E, 2H, D), (E, D, H)
    num_experts = down.shape[0] if num_experts is None else num_experts
    gate_up, down = gate_up[:num_experts], down[:num_experts]
    _, dim, hidden = down.shape
    shared = getattr(hf_block, family.shared_path) if family.shared_path else None
    if shared is not None and shared.gate_proj.out_features == 0:  # Qwen2-MoE with shared_expert_intermediate_size=0
        shared, routing = None, dataclasses.replace(routing, shared_gate=False)  # sigmoid(gate(x)) · 0 = 0
    jitter = getattr(hf_block, "jitter_noise", 0.0)
    if jitter:
        logger.warning("moefy.hf.from_hf: layer %s: router_jitter_noise=%s is not carried over (it scales the "
                       "experts' inputs too, which moefy's noise='jitter' does not); training routes without it",
                       routing.layer_id, jitter)
    block = HFMoEBlock(dim, hidden, num_experts, config.hidden_act,
                       shared.gate_proj.out_features if shared is not None else 0, source=type(hf_block).__name__,
                       config=routing)
    if block.num_columns != num_experts:
        raise ValueError(f"options: {routing.summary(num_experts)} adds router columns (hole / null experts) that "
                         f"the {type(hf_block).__name__} router has no weights for")
    block.to(device=down.device, dtype=down.dtype)
    gate = getattr(hf_block, family.router)
    block.router.to(dtype=gate.weight.dtype)  # DeepSeek-V3 keeps its router in float32 in a bf16 model
    with torch.no_grad():
        block.router.gate.weight.copy_(gate.weight[:num_experts])
        if block.config.selection_bias:
            block.router.score_correction_bias.copy_(gate.e_score_correction_bias[:num_experts])
        unstack_experts(block.experts, gate_up, down)
        if shared is not None:
            mine = block.shared_experts[0]
            for part in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine, part).weight.copy_(getattr(shared, part).weight)
        if block.shared_expert_gate is not None:
            block.shared_expert_gate.weight.copy_(hf_block.shared_expert_gate.weight)
    block.train(hf_block.training)
    return block


def _family(model: nn.Module) -> MoEFamily:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    transformers_module(moe_layout=True)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model: {type(model).__name__} (model_type {model_type!r}) is not a Hugging Face MoE "
                         f"model moefy imports; model types: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def from_hf(model: nn.Module, keep_router: Optional[bool] = None, **options) -> nn.Module:
    """Convert every MoE block of a transformers MoE model into an :class:`HFMoEBlock`, in place; or, for the
    families moefy has no RoutingConfig mapping of, every experts module into a
    :class:`~moefy.hf.generic.HFExpertsBlock` that keeps the family's router (:mod:`moefy.hf.generic`).

    Args:
        model: a transformers MoE model: a family in :data:`moefy.hf.families.FAMILIES` (``MixtralForCausalLM``,
            ``Qwen2MoeModel``, ``DeepseekV3ForCausalLM``, ...) or any other whose experts are called as
            ``experts(hidden_states, top_k_index, top_k_weights)`` (GPT-OSS, GLM-4-MoE, Qwen3-Next, ...).
        keep_router: None (default): the RoutingConfig mapping where moefy has one, else the family's router;
            True: keep the family's router (the general path) for every family; False: the mapping or an error.
        **options: RoutingConfig fields that replace the family's in every block, for training with moefy:
            ``aux_criterion={"switch": 0.01}``, ``bias_update_rate=1e-3`` (DeepSeek-V3's aux-loss-free
            balancing), ``fused`` (True unless given: the family's experts are identical SwiGLUs, run as one
            pass per layer, as transformers runs them; False: one module call per expert), ... . An option
            that changes the outputs (``hole``, ``noise``, ...) makes a block that :func:`moefy.hf.export`
            refuses.
    Returns:
        ``model``, its blocks replaced (each with ``layer_id`` = its decoder layer index); same logits.
        ``output_router_logits=True`` then raises (the HF routers are gone): use ``moefy.aux_loss(model)``.
        On the general path the family's routers stay, ``output_router_logits`` works, and the options are
        :data:`moefy.hf.generic.OPTIONS`.
    Raises:
        ValueError: not such a model, or it has no MoE block left to convert.
    """
    if keep_router not in (None, True, False):
        raise TypeError(f"keep_router must be None, True or False, got {keep_router!r}")
    if keep_router or keep_router is None and getattr(getattr(model, "config", None), "model_type", None) \
            not in FAMILIES and isinstance(model, nn.Module):
        transformers_module(moe_layout=True)
        return import_family(model, **options)
    family = _family(model)
    found = [(path, m) for path, m in model.named_modules() if type(m).__name__ == family.block]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no {family.block} left to convert (already "
                         f"converted by from_hf?)")
    base = family.routing_config(model.config)
    for i, (path, hf_block) in enumerate(found):
        routing = RoutingConfig.from_options(base, **{"layer_id": _layer_index(path, i), "fused": True, **options})
        _set_submodule(model, path, convert_block(hf_block, family, model.config, routing))
    _guard_router_logits(model)
    keep_save_pretrained(model)
    logger.info("moefy.hf.from_hf: %d %s blocks of %s -> HFMoEBlock", len(found), family.block, type(model).__name__)
    return model


def convert_at(model: nn.Module, path: str, routing: RoutingConfig, num_experts: Optional[int] = None) -> HFMoEBlock:
    """Convert the one HF MoE block at ``path`` of ``model`` in place, routing by ``routing`` (what
    :func:`moefy.load` re-applies from ``moefy.json``). ``num_experts``: the number of experts the block must have
    (what the weights file holds), checked before any expert is built."""
    family = _family(model)
    hf_block = model.get_submodule(path)
    if type(hf_block).__name__ != family.block:
        raise ValueError(f"model: {path!r} is a {type(hf_block).__name__}, not a {family.block}")
    stacked = getattr(getattr(hf_block, "experts", None), "down_proj", None)
    if num_experts is not None and (not isinstance(stacked, torch.Tensor) or stacked.shape[0] < num_experts):
        has = stacked.shape[0] if isinstance(stacked, torch.Tensor) else "no stacked"
        raise ValueError(f"model: {path!r} ({family.block}) has {has} experts, but the weights hold {num_experts} "
                         f"there; pass the model this folder was saved from")
    block = convert_block(hf_block, family, model.config, routing, num_experts)
    _set_submodule(model, path, block)
    _guard_router_logits(model)
    return block


def _refuse_router_logits(model: nn.Module, args, kwargs):
    if kwargs.get("output_router_logits", getattr(model.config, "output_router_logits", False)):
        raise ValueError("output_router_logits=True: after moefy.hf.from_hf the model's routers are moefy "
                         "routers, which transformers' router-logit recording does not see; train with "
                         "moefy.aux_loss(model) (from_hf(model, aux_criterion=...)) and read block.routing")


def _guard_router_logits(model: nn.Module) -> None:
    """A clear error for ``output_router_logits=True`` instead of transformers' IndexError deep inside."""
    if not getattr(model, "_moefy_router_logits_guard", False):
        model.register_forward_pre_hook(_refuse_router_logits, with_kwargs=True)
        model._moefy_router_logits_guard = True


# moefy.save records each HFMoEBlock; moefy.load converts the HF block at its path again
register(RecordedBlock(HFMoEBlock, {"source": str}, lambda block: {"source": block.source},
                       lambda model, path, routing, num_experts, fields: convert_at(model, path, routing, num_experts)))
# and each family-routed block: moefy.load replaces the family's experts module at its path again, its router kept
register(RecordedBlock(HFExpertsBlock, {"source": str, "math": str, "num_experts": int}, describe_family_block,
                       convert_family_at, choices={"math": MATHS}, stacked="hf_experts",
                       save_pretrained=keep_family_layout))
