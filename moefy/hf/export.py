"""export(): a moefied Hugging Face model as a native transformers MoE checkpoint.

A moefied Llama / Mistral becomes a Mixtral checkpoint, a moefied Qwen2 / Qwen3 a Qwen2-MoE / Qwen3-MoE one (with
the dense layers that were not moefied as ``mlp_only_layers``), and a model imported by :func:`moefy.hf.from_hf`
goes back to its own architecture with the same weights: restacked from its moefy blocks where its routing was
mapped onto RoutingConfig, as they are where it kept its family's routers (:mod:`moefy.hf.generic`: the weights
never left the family's experts modules; a ``token_capacity_factor`` is refused, its experts compute every pick). The folder is written by transformers' own
``save_pretrained``, so ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it without moefy.
A model made smaller by :mod:`moefy.compress` (``prune_experts`` / ``merge_experts``) is written as the same
architecture with its blocks' expert count; layers of different counts are refused, naming each (the
architecture has one count per model).

What the target cannot express is refused, naming the option and the architecture: routing options that change
its outputs (hole, expert choice, noise, capacity, sigmoid scores, groups, ... — every RoutingConfig field but
:data:`~moefy.hf.families.TRAINING_ONLY`), experts that are not bias-free SwiGLU MLPs with the model's
activation, shared experts where it has none, mixtures anywhere but the decoder MLPs, weights it has no place for.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..block import MoEBlock
from .block import concat_swiglu, linear_weight, same_activation, stack_experts, swiglu_weights
from .families import TRAINING_ONLY, MoEFamily, family_of, transformers_module
from .generic import HFExpertsBlock, family_blocks, family_state_dict

logger = logging.getLogger(__name__)

_NOT_CONFIG = ("model_type", "architectures", "transformers_version", "_name_or_path")


def _decoder_mixtures(model: nn.Module, family: MoEFamily) -> Dict[int, Tuple[str, MoEBlock]]:
    """{decoder layer index: (path, block)} of every mixture; each must be a whole decoder MLP."""
    layers = {}
    for path, m in model.named_modules():
        if not isinstance(m, MoEBlock) or any(path.startswith(p + ".") for p, _ in layers.values()):
            continue
        found = re.fullmatch(rf"(?:.*\.)?layers\.(\d+)\.{family.mlp}", path)
        if found is None:
            raise ValueError(f"model: the mixture at {path!r} is not a decoder layer's MLP (layers.<i>.{family.mlp}); "
                             f"{family.name} has mixtures only there")
        layers[int(found.group(1))] = (path, m)
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no mixture to export; moefy its MLPs first "
                         f"(moefy(model, num_experts, k, target='mlp'))")
    return layers


def _expert_count(layers: Dict[int, Tuple[str, MoEBlock]], family: MoEFamily) -> int:
    """The one number of routed experts of every mixture (after :func:`moefy.compress.prune_experts` /
    ``merge_experts``, a layer may have fewer than another); ValueError naming each layer's count otherwise."""
    counts = {path: block.num_experts for _, (path, block) in sorted(layers.items())}
    if len(set(counts.values())) > 1:
        per_layer = ", ".join(f"{path}: {n}" for path, n in counts.items())
        raise ValueError(f"model: its layers have different expert counts ({per_layer}); {family.name} has one "
                         f"expert count per model (config.{family.num_experts}): prune or merge every layer to "
                         f"the same number (keep=<int>) to export it")
    return next(iter(counts.values()))


def _imported_config(config, family: MoEFamily, num_experts: int):
    """An imported model's own config, with its expert count set to its blocks' (a copy where they differ)."""
    if getattr(config, family.num_experts) == num_experts:
        return config
    logger.info("moefy.hf.export: config.%s=%s, the blocks have %d experts each: written as %d",
                family.num_experts, getattr(config, family.num_experts), num_experts, num_experts)
    config = copy.deepcopy(config)
    setattr(config, family.num_experts, num_experts)
    return config


def _moe_config(model: nn.Module, family: MoEFamily, layers: Dict[int, Tuple[str, MoEBlock]]):
    """The target config of a moefied dense model: its own fields, plus the mixtures' sizes and routing."""
    transformers = transformers_module()
    dense = model.config
    path, block = layers[min(layers)]
    hidden = swiglu_weights(block.experts[0], f"{path}.experts.0")[0].shape[0]
    shared = list(block.shared_experts or [])
    dense_layers = sorted(set(range(dense.num_hidden_layers)) - set(layers))
    if dense_layers and not family.partial:
        raise ValueError(f"model: decoder layers {dense_layers} keep a dense MLP; {family.name} has a mixture in "
                         f"every layer: moefy every layer's mlp")
    fields = {k: v for k, v in dense.to_dict().items() if k not in _NOT_CONFIG}
    fields.update({family.num_experts: block.num_experts, "num_experts_per_tok": block.k,
                   family.expert_hidden: hidden, "output_router_logits": False})
    if family.partial:
        fields.update(decoder_sparse_step=1, mlp_only_layers=dense_layers, norm_topk_prob=block.normalize)
    if family.shared == "gated":
        fields["shared_expert_intermediate_size"] = sum(
            swiglu_weights(m, f"{path}.shared_experts.{j}")[0].shape[0] for j, m in enumerate(shared))
    if family.model_type == "mixtral":
        fields["router_jitter_noise"] = 0.0
    return getattr(transformers, f"{family.name}Config")(**fields)


def _check_block(path: str, block: MoEBlock, family: MoEFamily, config) -> None:
    """ValueError naming the first option / expert of ``block`` that ``family`` under ``config`` cannot express."""
    want = family.routing_config(config)
    for field in type(want).__dataclass_fields__:
        got, needed = getattr(block.config, field), getattr(want, field)
        if field in TRAINING_ONLY or got == needed or (field == "shared_gate" and block.shared_experts is None):
            continue
        raise ValueError(f"{path}: {field}={got!r} cannot be exported to {family.name}: its router computes with "
                         f"{field}={needed!r}")
    if block.shared_experts is not None and family.shared is None:
        raise ValueError(f"{path}: num_shared={len(block.shared_experts)} cannot be exported to {family.name}: it "
                         f"has no shared expert")
    linear_weight(block.router.gate, f"{path}.router.gate")  # a PEFT adapter there: merge it first
    linear_weight(block.shared_expert_gate, f"{path}.shared_expert_gate")
    for name, experts in (("experts", block.experts), ("shared_experts", block.shared_experts or [])):
        for i, expert in enumerate(experts):
            swiglu_weights(expert, f"{path}.{name}.{i}")
            if not same_activation(expert, config.hidden_act):
                raise ValueError(f"{path}.{name}.{i}: its activation {type(expert.act_fn).__name__} is not the "
                                 f"{family.name} config's hidden_act={config.hidden_act!r}")


def _block_state(path: str, block: MoEBlock, family: MoEFamily) -> Dict[str, torch.Tensor]:
    """The HF block's weights, named as in transformers' modules, from a moefy block."""
    p = path + "."
    gate_up, down = stack_experts(block.experts, f"{path}.experts")  # (E, 2H, D), (E, D, H)
    router = p + family.router + "."
    state = {router + "weight": block.router.gate.weight.detach(), p + "experts.gate_up_proj": gate_up,
             p + "experts.down_proj": down}
    if block.config.selection_bias:  # _check_block: only where the family has one
        state[router + "e_score_correction_bias"] = block.router.score_correction_bias.detach()
    if family.shared is not None:
        parts = concat_swiglu(block.shared_experts or [], f"{path}.shared_experts", block.input_dim)
        for part, w in zip(("gate_proj", "up_proj", "down_proj"), parts):
            state[f"{p}{family.shared_path}.{part}.weight"] = w.to(down.dtype)
    if family.shared == "gated":
        g = block.shared_expert_gate
        state[p + "shared_expert_gate.weight"] = g.weight.detach() if g is not None else down.new_zeros(1, block.input_dim)
    return state


def _target_class(model: nn.Module, family: MoEFamily):
    transformers = transformers_module()
    own = type(model.config).__name__[:-len("Config")]
    name = type(model).__name__
    target = family.name + name[len(own):] if name.startswith(own) else name
    cls = getattr(transformers, target, None)
    if cls is None:
        raise ValueError(f"model: {name} has no {family.name} counterpart in transformers ({target} does not exist)")
    return cls


def export(model: nn.Module, folder) -> str:
    """Write ``model`` as a native transformers MoE checkpoint (``save_pretrained`` format) into ``folder``.

    Args:
        model: a transformers model whose decoder MLPs are moefy mixtures: a moefied Llama / Mistral / Qwen2 /
            Qwen3 (``moefy(model, E, k, target="mlp")``, SwiGLU experts), or a model converted by
            :func:`moefy.hf.from_hf`.
        folder: created if missing.
    Returns:
        ``folder``; ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` (or the model's own head
        class) gives the same logits.
    Raises:
        ValueError: what the target architecture cannot express, named (see the module docstring).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (with .config), got {type(model).__name__}")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    transformers_module(moe_layout=True)
    if family_blocks(model):
        return _export_family_routed(model, folder)
    family = family_of(model)
    layers = _decoder_mixtures(model, family)
    num_experts = _expert_count(layers, family)
    imported = model.config.model_type == family.model_type
    config = _imported_config(model.config, family, num_experts) if imported else _moe_config(model, family, layers)
    state = {}
    for path, block in layers.values():
        _check_block(path, block, family, config)
        state.update(_block_state(path, block, family))
    inside = tuple(path + "." for path, _ in layers.values())
    state.update({k: v.detach() for k, v in model.state_dict().items() if not k.startswith(inside)})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # Qwen2-MoE without shared expert
        target = _target_class(model, family)(config)
    _check_keys(target, state, family, model)
    target.load_state_dict(state, strict=True, assign=True)
    target.save_pretrained(folder)
    return folder


def _export_family_routed(model: nn.Module, folder) -> str:
    """A model imported with the family's routers kept (:mod:`moefy.hf.generic`): its own class, its state dict in
    the family's layout (the experts' weights never left the family's modules)."""
    name = type(model).__name__
    for path, block in model.named_modules():
        if isinstance(block, MoEBlock) and not isinstance(block, HFExpertsBlock):
            raise ValueError(f"model: the mixture at {path!r} is a {type(block).__name__}, which {name} has no place "
                             f"for (only the experts modules from_hf replaced go back)")
    for path, block in family_blocks(model):
        if block.config.token_capacity_factor is not None:
            raise ValueError(f"{path}: token_capacity_factor={block.config.token_capacity_factor!r} cannot be "
                             f"exported to {name}: its experts compute every pick its router makes")
    state = {k: v.detach() for k, v in family_state_dict(model).items()}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        target = type(model)(model.config)
    extra, missing, shapes = _differences(target, state, "")
    if extra or missing or shapes:
        raise ValueError(f"model: {name} does not fit its own class any more: weights it has no place for "
                         f"{extra[:6]} (a PEFT adapter or a parametrization: merge it first), weights it lacks "
                         f"{missing[:6]}, shape mismatches {shapes[:6]}")
    type(model).save_pretrained(model, folder, state_dict=state)  # transformers' own writer, the family's layout
    return folder


def _differences(target: nn.Module, state: Dict[str, torch.Tensor], owner: str) -> Tuple[List[str], ...]:
    """``(keys target has no place for, keys it lacks, "key: shape for <owner>shape")`` of ``state`` against
    ``target``'s state dict."""
    own = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    shapes = sorted(f"{k}: {tuple(state[k].shape)} for {owner}{own[k]}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != own[k])
    return sorted(set(state) - set(own)), sorted(set(own) - set(state)), shapes


def _check_keys(target: nn.Module, state: Dict[str, torch.Tensor], family: MoEFamily, model: nn.Module) -> None:
    extra, missing, shapes = _differences(target, state, f"{family.name}'s ")
    if missing or extra or shapes:
        raise ValueError(f"model: {type(model).__name__} does not fit {family.name}: weights {family.name} has no "
                         f"place for {extra[:6]}, weights it needs that the model lacks {missing[:6]}, shape "
                         f"mismatches {shapes[:6]}")

