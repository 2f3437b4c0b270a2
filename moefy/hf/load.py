"""load(): a folder written by :func:`moefy.save` (or a moefied model's ``save_pretrained``) back into a model,
building the base from the ``config.json`` beside the weights, as PEFT's ``AutoPeftModel.from_pretrained`` does.

The folder is untrusted input. No Auto class reads it, so no code from it runs (``auto_map`` is not followed):
``model_type`` must be one of the installed transformers', ``architectures[0]`` one of its ``PreTrainedModel``
classes for that config. The base is first built on the meta device (no memory) and checked, converted, against
every key and shape of the weights' header; the real model is built only then.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn

from ..convert.folder import bad, check_folder, read_json_file
from ..convert.loader import Plan, apply, check_on_meta, prepare
from .families import FAMILIES, transformers_module

logger = logging.getLogger(__name__)

NOT_READ = ("transformers_weights", "auto_map")  # moefy.save's guard for a dense from_pretrained; remote code


def _int_fields(config: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, int]]:
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool):
            yield prefix + key, value
        elif isinstance(value, dict) and prefix.count(".") < 2:
            yield from _int_fields(value, f"{prefix}{key}.")


def _check_layers(config: Dict[str, Any], attribute_map: Dict[str, str], plan: Plan, path: str) -> None:
    """A layer count larger than the number of tensors in the weights is refused before a layer is built."""
    names = {"num_hidden_layers", attribute_map.get("num_hidden_layers", "num_hidden_layers")}
    tensors = len(plan.header.tensors)
    for field, value in _int_fields(config):
        if field.rsplit(".", 1)[-1] in names and value > tensors:
            raise bad(path, field, f"{value} layers, but {os.path.basename(plan.weights)} holds {tensors} tensors in "
                                   f"all; allowed: at most {tensors}")


def _base_class(config: Any, path: str, plan: Plan):
    """The checked ``(config, model class)`` that ``config.json`` describes."""
    transformers = transformers_module()
    from transformers.models.auto.configuration_auto import (CONFIG_MAPPING, CONFIG_MAPPING_NAMES,
                                                             model_type_to_module_name)
    if not isinstance(config, dict):
        raise bad(path, "JSON", "allowed: an object (a transformers config)")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise bad(path, "model_type", f"{model_type!r} is not a model type of transformers "
                                      f"{transformers.__version__}; moefy.hf.load runs no code from the folder "
                                      f"(auto_map is not followed); allowed: a built-in model type ('llama', ...)")
    config_class = CONFIG_MAPPING[model_type]
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names else None
    cls = None
    if isinstance(name, str) and name.isidentifier() and not name.startswith("_"):  # a class of that model's package
        package = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
        cls = getattr(package, name, None)
    expected = getattr(cls, "config_class", None) if isinstance(cls, type) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and isinstance(expected, type) and issubclass(config_class, expected)):
        raise bad(path, "architectures", f"{names!r}: allowed: a list whose first name is a transformers "
                                         f"PreTrainedModel class of model_type {model_type!r} (as save_pretrained "
                                         f"writes it); or build the base yourself and call moefy.load(base, folder)")
    _check_layers(config, getattr(config_class, "attribute_map", {}) or {}, plan, path)
    if "auto_map" in config:
        logger.warning("moefy.hf.load: %s names remote code (auto_map); it is not run: %s is built from "
                       "transformers' own code", path, name)
    fields = {k: v for k, v in config.items() if k not in NOT_READ}
    decode = getattr(config_class, "_decode_special_floats", None)  # {"__float__": "Infinity"}, as from_pretrained
    try:
        built = config_class.from_dict(decode(fields) if decode is not None else fields)
    except Exception as err:  # noqa: BLE001 (any config class's validation error)
        raise bad(path, "config", f"{config_class.__name__} refuses it ({type(err).__name__}: {err})") from None
    return built, cls


def _build(cls, config, path: str) -> nn.Module:
    try:
        return cls(config)
    except Exception as err:  # noqa: BLE001 (whatever the model class raises for its config)
        raise bad(path, "config", f"transformers cannot build {cls.__name__} from it ({type(err).__name__}: "
                                  f"{err})") from None


def _named_sizes(err: ValueError, config: Dict[str, Any], plan: Plan, path: str) -> ValueError:
    """The config.json fields behind a size mismatch: those whose value the error names and the weights do not
    hold (a vocab_size, a num_local_experts); the error itself where there is none, or where it names a field of
    moefy.json already."""
    if str(err).startswith(f"{plan.meta.path}: "):
        return err
    held = {d for _, shape in plan.header.tensors.values() for d in shape}
    said = {int(n) for n in re.findall(r"\d+", re.sub(r"\S*/\S*", "", str(err))) if len(n) < 20}  # no paths
    fields = [f for f, v in _int_fields(config) if v in said and v not in held and v > 1]
    return bad(path, ", ".join(fields), str(err)) if fields else err


def load(folder) -> nn.Module:
    """The moefied transformers model saved in ``folder``: its base class built from ``config.json`` (random
    weights, never downloaded), then :func:`moefy.load` (every conversion re-applied, every weight loaded strictly).

    Args:
        folder: written by :func:`moefy.save` from a transformers model (it holds ``config.json``).
    Returns:
        the model, in eval mode as ``from_pretrained`` returns one; every tensor in its saved dtype.
    Raises:
        FileNotFoundError: no folder, no ``config.json`` or ``moefy.json``, or a file they name is missing.
        ValueError: a malformed or inconsistent field, naming the file and the field (see the module doc).
    """
    folder = check_folder(folder)
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        raise FileNotFoundError(f"folder {folder!r} has no config.json: it was not saved from a transformers model; "
                                f"build the base yourself and call moefy.load(base, folder)")
    plan = prepare(folder)
    record = (plan.meta.files or {}).get("config.json")
    config = read_json_file(folder, "config.json", "file", path, record=record)
    hf_config, cls = _base_class(config, path, plan)
    with torch.device("meta"):
        shadow = _build(cls, hf_config, path)
    try:
        check_on_meta(shadow, plan)
    except ValueError as err:
        raise _named_sizes(err, config, plan, path) from None
    _check_expert_count(config, plan, path)
    return apply(_build(cls, hf_config, path), plan).eval()


def _check_expert_count(config: Dict[str, Any], plan: Plan, path: str) -> None:
    """An imported family's expert count may exceed what a layer holds (:mod:`moefy.compress` made it smaller), but
    not the most any layer holds: the base is built with that many experts per layer before the weights load."""
    family = FAMILIES.get(config.get("model_type"))
    value = config.get(family.num_experts) if family is not None else None
    if not plan.experts or isinstance(value, bool) or not isinstance(value, int):
        return
    held = max(plan.experts.values())
    if value > held:
        raise bad(path, family.num_experts, f"{value} experts, but {os.path.basename(plan.weights)} holds at most "
                                            f"{held} in a layer; allowed: at most {held}")
