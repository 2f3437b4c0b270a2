"""save / load a moefied model without loss, PEFT-style: a JSON description of every conversion
(``moefy.json``, like PEFT's ``adapter_config.json``) next to the weights (``moefy.safetensors``, or ``moefy.pt``
without the optional ``safetensors`` package), and a Hugging Face model's ``config.json``.

:func:`load` takes a fresh *dense* base model of the same architecture, re-applies every recorded
:func:`~moefy.convert.surgery.moefy` / :func:`~moefy.convert.surgery.moefy_chain` call on the same path with the
same :class:`~moefy.config.RoutingConfig` (``expert_noise=0``: the weights come from the file), then loads the
weights with ``load_state_dict(strict=True)``. A model imported by :func:`moefy.hf.from_hf` loads into a fresh model of
its own HF MoE class: each recorded block is converted again.

Hugging Face models: ``from_pretrained`` knows nothing of the experts, so a folder must never look like a dense
checkpoint to it. The weights file is not ``model.safetensors``, and ``config.json`` names a weights file
(``transformers_weights``) that ``from_pretrained`` refuses with a ``ValueError`` naming :func:`moefy.hf.load`,
instead of building the dense model with fresh MLP weights. A moefied (or imported) HF model's own
``save_pretrained`` writes this format too (:func:`keep_save_pretrained`), as a PEFT model's writes its adapter.
For ``transformers.Trainer`` (``resume_from_checkpoint``, ``load_best_model_at_end``) the folder also holds
``model.safetensors.index.json``, a one-shard index of the moefy weights file: Trainer loads the shard into the
moefied model it trains (``load_state_dict``). The index has no ``metadata``, which ``from_pretrained`` reads:
a transformers that ignores ``transformers_weights`` fails on it too (``KeyError: 'metadata'``).
:func:`moefy.hf.export` writes a checkpoint ``from_pretrained`` does load, as a native MoE architecture.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..config import RoutingConfig
from ..hf.block import HFMoEBlock
from .mixture import AttentionMixture, ModuleMixture
from .surgery import _mixture, _set_submodule, moefy_chain

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "moefy.json"
SAFETENSORS_NAME, TORCH_NAME = "moefy.safetensors", "moefy.pt"
# transformers' names (SAFE_WEIGHTS_INDEX_NAME / WEIGHTS_INDEX_NAME): Trainer accepts a checkpoint that has one
TRAINER_INDEX_NAMES = {SAFETENSORS_NAME: "model.safetensors.index.json", TORCH_NAME: "pytorch_model.bin.index.json"}
# config.json's ``transformers_weights``: from_pretrained raises a ValueError ending with it (not *.safetensors)
NOT_DENSE = "moefy checkpoint, not a dense one: load it with moefy.hf.load(folder)"
_CLASSES = {"ModuleMixture": ModuleMixture, "AttentionMixture": AttentionMixture}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")


def describe(model: nn.Module) -> List[Dict[str, Any]]:
    """One JSON-serialisable entry per mixture made by ``moefy()`` / ``moefy_chain()``, in module order."""
    _check_model(model)
    entries, seen = [], []
    for path, m in model.named_modules():
        if not isinstance(m, (ModuleMixture, HFMoEBlock)):
            continue
        if any(path.startswith(s + ".") for s in seen):
            raise ValueError(f"model: mixture {path!r} is nested inside mixture {seen[-1]!r}; moefy.save "
                             f"records top-level conversions only")
        seen.append(path)
        cls = type(m).__name__
        if isinstance(m, HFMoEBlock):  # made by moefy.hf.from_hf: load converts the HF block at path again
            entries.append({"path": path, "class": cls, "source": m.source,
                            "config": _jsonable(dataclasses.asdict(m.config))})
            continue
        if cls not in _CLASSES:
            raise ValueError(f"model: {path!r} is a {cls}, a subclass of ModuleMixture that moefy.load cannot "
                             f"rebuild; only ModuleMixture and AttentionMixture (made by moefy()) and HFMoEBlock "
                             f"(made by moefy.hf.from_hf) are recorded")
        entry = {"path": path, "class": cls, "num_experts": m.num_experts,
                 "num_shared": len(m.shared_experts) if m.shared_experts is not None else 0,
                 "input_dim": m.input_dim, "config": _jsonable(dataclasses.asdict(m.config)), "chain": None,
                 "granularity": getattr(m, "granularity", 1)}
        if m.dense_sources is not None:  # moefy_chain: parent = dense_root_depth levels above the mixture
            parts = path.split(".")
            entry["chain"] = {"parent": ".".join(parts[:len(parts) - m.dense_root_depth]),
                              "names": [m.dense_sources[str(i)] for i in range(len(m.dense_sources))]}
        entries.append(entry)
    return entries


def _tensors(state: Dict[str, torch.Tensor]):
    """The state dict with tensors that share storage stored once: ``(tensors, aliases {key: kept key})``."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        ptr = t.untyped_storage().data_ptr()
        tensors[key] = t.contiguous().cpu() if not (t.numel() and ptr in storages) else t.clone().cpu()
        storages.add(ptr)
    return tensors, aliases


def save(model: nn.Module, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write ``model``'s weights and ``moefy.json`` (every conversion, for :func:`load`) into ``folder``.

    Args:
        model: a moefied model (or any module: then ``moefy.json`` lists no conversion).
        folder: created if missing.
        state_dict: the weights to write, with ``model.state_dict()``'s keys (what Trainer passes to
            ``save_pretrained`` after gathering them); default ``model.state_dict()``.
    Returns:
        the path of the weights file written: ``moefy.safetensors`` with the ``safetensors`` package
        (``pip install moefy[save]``), else ``moefy.pt`` (``torch.save`` of the state dict). A Hugging Face
        model's ``config.json`` is written next to it.
    """
    _check_model(model)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    entries = describe(model)
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict()
    if state_dict is not None:
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(state):
            raise ValueError("state_dict must be a dict with exactly model.state_dict()'s keys")
        state = state_dict
    tensors, aliases = _tensors(state)
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    name = SAFETENSORS_NAME if save_file is not None else TORCH_NAME
    path = os.path.join(folder, name)
    if save_file is not None:
        save_file(tensors, path, metadata={"format": "pt", "saved_by": "moefy"})
    else:
        torch.save(tensors, path)
    meta = {"format_version": FORMAT_VERSION, "weights": name, "aliases": aliases, "conversions": entries}
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    hf_config = getattr(model, "config", None)
    if callable(getattr(hf_config, "save_pretrained", None)):
        _save_hf_config(hf_config, type(model).__name__, folder)
        _save_trainer_index(folder, name, list(tensors))
    return path


def _save_hf_config(hf_config, architecture: str, folder) -> None:
    """``config.json``: the base's architecture (what :func:`moefy.hf.load` builds) and ``transformers_weights``
    set to :data:`NOT_DENSE`, so a dense ``from_pretrained(folder)`` raises instead of loading fresh MLPs."""
    hf_config = copy.deepcopy(hf_config)
    hf_config.architectures = [architecture]
    hf_config.save_pretrained(folder)  # drops transformers_weights: it is only read on load
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["transformers_weights"] = NOT_DENSE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _save_trainer_index(folder, weights: str, keys: List[str]) -> None:
    """A one-shard index of ``weights`` (every key stored in it; aliases left out, as transformers leaves out tied
    weights), by the name ``transformers.Trainer`` looks for when it resumes or loads the best checkpoint."""
    index = {"weight_map": {key: weights for key in keys},
             "moefy": f"{NOT_DENSE}; transformers.Trainer loads {weights} into the moefied model it trains"}
    with open(os.path.join(folder, TRAINER_INDEX_NAMES[weights]), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _save_pretrained(model: nn.Module, save_directory, *args, state_dict=None, push_to_hub=False,
                     is_main_process: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a moefied HF model: :func:`save` (``state_dict`` and ``is_main_process`` honoured;
    sharding / serialisation options do not apply to moefy's one file)."""
    if push_to_hub:
        raise ValueError("push_to_hub=True: a moefied model's save_pretrained writes moefy.save's format and uploads "
                         "nothing; call model.push_to_hub(repo_id), which uploads the folder it writes")
    if not is_main_process:  # as transformers' own: in distributed training one process writes the folder
        return
    logger.info("moefy: %s.save_pretrained(%r) writes moefy.save's format (moefy.json + %s): load it with "
                "moefy.load(base, folder); moefy.hf.export(model, folder) writes a native MoE checkpoint",
                type(model).__name__, os.fspath(save_directory), SAFETENSORS_NAME)
    save(model, save_directory, state_dict)


def keep_save_pretrained(model: nn.Module) -> None:
    """Make a moefied Hugging Face model's ``save_pretrained`` (what Trainer and push_to_hub call) write
    :func:`save`'s format, so no folder of it reloads as a dense model with fresh MLP weights."""
    _check_model(model)
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.save_pretrained = functools.partial(_save_pretrained, model)


def _read(folder) -> Dict[str, Any]:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {os.fspath(folder)!r} does not exist or is not a directory")
    config = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config):
        files = sorted(os.listdir(folder))
        how = (" It looks like a dense Hugging Face checkpoint (config.json): load it with from_pretrained, moefy it, "
               "and save the moefied model with moefy.save(model, folder) or its save_pretrained."
               if "config.json" in files else " Save a moefied model with moefy.save(model, folder).")
        raise FileNotFoundError(f"folder {os.fspath(folder)!r} has no {CONFIG_NAME} (files: {files}), so it was "
                                f"not written by moefy.save.{how}")
    with open(config, encoding="utf-8") as f:
        meta = json.load(f)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"folder {os.fspath(folder)!r}: {CONFIG_NAME} has format_version {version!r}; this moefy "
                         f"reads format_version {FORMAT_VERSION}")
    return meta


def _apply(model: nn.Module, entry: Dict[str, Any], folder) -> nn.Module:
    """Re-apply one recorded conversion to ``model`` in place; the new mixture (or the root one)."""
    config = RoutingConfig(**entry["config"])
    if entry["class"] == "HFMoEBlock":
        from ..hf.from_hf import convert_at
        return convert_at(model, entry["path"], config)
    options = dict(num_experts=entry["num_experts"], config=config, input_dim=entry["input_dim"],
                   num_shared=entry["num_shared"], expert_noise=0.0, granularity=entry.get("granularity", 1))
    path, chain = entry["path"], entry["chain"]
    try:
        if chain is not None:
            parent = model.get_submodule(chain["parent"]) if chain["parent"] else model
            return moefy_chain(parent, chain["names"], **options)
        dense = model.get_submodule(path) if path else model
    except (AttributeError, ValueError) as err:
        raise ValueError(f"model: the base model has no submodule {path!r} that {CONFIG_NAME} in "
                         f"{os.fspath(folder)!r} converts ({err}); pass the dense model this folder was "
                         f"saved from") from err
    if entry["class"] == "ModuleMixture":  # route / feature_dim as saved, not re-inferred
        options.update(route=config.route, feature_dim=config.feature_dim)
    mixture = _mixture(dense, **options)
    if type(mixture).__name__ != entry["class"]:
        raise ValueError(f"model: {path!r} in the base model is a {type(dense).__name__}, which moefy turns into "
                         f"a {type(mixture).__name__}; {CONFIG_NAME} in {os.fspath(folder)!r} records a "
                         f"{entry['class']}")
    if path:
        _set_submodule(model, path, mixture)
    return mixture


def _load_weights(folder, meta: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    path = os.path.join(folder, meta.get("weights", ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"folder {os.fspath(folder)!r}: weights file {meta.get('weights')!r} is missing")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"folder {os.fspath(folder)!r} holds {SAFETENSORS_NAME}: pip install safetensors "
                              f"(or moefy[save])") from err
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key, kept in meta.get("aliases", {}).items():
        state[key] = state[kept]
    return state


def load(model: nn.Module, folder) -> nn.Module:
    """Re-apply every conversion recorded by :func:`save` in ``folder`` to the dense base ``model`` (in place),
    then load the saved weights strictly.

    Returns:
        ``model``, converted and loaded (the new mixture if the saved model was itself one mixture).
    Raises:
        FileNotFoundError: ``folder`` missing, or not written by :func:`save` (no ``moefy.json``).
        ValueError: a recorded path missing from ``model``, or missing / unexpected / mis-shaped weights.
    """
    _check_model(model)
    meta = _read(folder)
    for entry in meta["conversions"]:
        result = _apply(model, entry, folder)
        if not entry["path"]:
            model = result
    state = _load_weights(folder, meta)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"model does not match the weights in {os.fspath(folder)!r}: missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}"
                         + (" (and more)" if max(len(missing), len(unexpected), len(shapes)) > 8 else "")
                         + "; pass the dense model this folder was saved from")
    _match_dtypes(model, state)
    model.load_state_dict(state, strict=True)
    if meta["conversions"]:
        keep_save_pretrained(model)
    return model


def _match_dtypes(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Give every floating tensor the saved dtype, so a router cast with the model (``model.double()`` after
    ``moefy``, where a rebuilt router is float32) computes what it computed when saved."""
    for key, tensor in model.state_dict(keep_vars=True).items():
        saved = state[key]
        if tensor.dtype != saved.dtype and tensor.is_floating_point() and saved.is_floating_point():
            with torch.no_grad():
                tensor.data = tensor.data.to(saved.dtype)
