"""Writing a moefy checkpoint folder, crash-safe (:mod:`moefy.convert.atomic`); the format is described in
:mod:`moefy.convert.save`.

A save writes every file under a temporary name, removes the stale files another loader would pick up, renames
the files into place and ``moefy.json`` last: ``moefy.json`` is the commit record. It names each file it commits
with its size and either the save's id (written into the safetensors header) or its sha256, so a folder with the
weights of one save and the ``moefy.json`` of another never loads (:mod:`moefy.convert.folder` checks).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .atomic import FolderWrite, is_temp, remove_files
from .mixture import ModuleMixture
from .recorded import RECORDED

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: moefy.json records the files it commits ("files"); 1 (read too): no record
READ_VERSIONS = (1, 2)
CONFIG_NAME = "moefy.json"
SAFETENSORS_NAME, TORCH_NAME = "moefy.safetensors", "moefy.pt"
# transformers' names (SAFE_WEIGHTS_INDEX_NAME / WEIGHTS_INDEX_NAME): Trainer accepts a checkpoint that has one
TRAINER_INDEX_NAMES = {SAFETENSORS_NAME: "model.safetensors.index.json", TORCH_NAME: "pytorch_model.bin.index.json"}
# config.json's ``transformers_weights``: from_pretrained raises a ValueError ending with it (not *.safetensors)
NOT_DENSE = "moefy checkpoint, not a dense one: load it with moefy.hf.load(folder)"
# what from_pretrained / Trainer load from a folder (transformers' names), stale once moefy saves into it
DENSE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
DENSE_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_MIXTURES = ("ModuleMixture", "AttentionMixture")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")


def describe(model: nn.Module) -> List[Dict[str, Any]]:
    """One JSON-serialisable entry per mixture made by ``moefy()`` / ``moefy_chain()`` (or registered in
    :mod:`moefy.convert.recorded`, as ``HFMoEBlock``), in module order."""
    check_model(model)
    entries, seen = [], []
    recorded = tuple(r.cls for r in RECORDED.values())
    for path, m in model.named_modules():
        if not isinstance(m, (ModuleMixture,) + recorded):
            continue
        if any(path.startswith(s + ".") for s in seen):
            raise ValueError(f"model: mixture {path!r} is nested inside mixture {seen[-1]!r}; moefy.save "
                             f"records top-level conversions only")
        seen.append(path)
        cls = type(m).__name__
        if isinstance(m, recorded):  # e.g. made by moefy.hf.from_hf: load converts the HF block at path again
            entries.append({"path": path, "class": cls, **RECORDED[cls].describe(m),
                            "config": _jsonable(dataclasses.asdict(m.config))})
            continue
        if cls not in _MIXTURES:
            raise ValueError(f"model: {path!r} is a {cls}, a subclass of ModuleMixture that moefy.load cannot "
                             f"rebuild; only ModuleMixture and AttentionMixture (made by moefy()) and "
                             f"{sorted(RECORDED)} are recorded")
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


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _write_weights(tensors: Dict[str, torch.Tensor], path: str, *, name: str, save_id: str) -> None:
    """The weights file ``name`` at ``path``: safetensors (the save's id in its header) or ``torch.save``."""
    if name == SAFETENSORS_NAME:
        from safetensors.torch import save_file
        save_file(tensors, path, metadata={"format": "pt", "saved_by": "moefy", "moefy_save_id": save_id})
    else:
        torch.save(tensors, path)


def _json_bytes(data: Any, **options) -> bytes:
    return (json.dumps(data, indent=2, **options) + "\n").encode("utf-8")


def _hf_config_bytes(hf_config, architecture: str) -> bytes:
    """``config.json``: the base's architecture (what :func:`moefy.hf.load` builds) and ``transformers_weights``
    set to :data:`NOT_DENSE`, so a dense ``from_pretrained(folder)`` raises instead of loading fresh MLPs."""
    hf_config = copy.deepcopy(hf_config)
    hf_config.architectures = [architecture]
    if hasattr(hf_config, "transformers_weights"):
        delattr(hf_config, "transformers_weights")
    if callable(getattr(hf_config, "validate", None)):  # as config.save_pretrained does
        hf_config.validate()
    config = json.loads(hf_config.to_json_string(use_diff=True))
    config["transformers_weights"] = NOT_DENSE
    return _json_bytes(config, sort_keys=True)


def _trainer_index_bytes(weights: str, keys: List[str]) -> bytes:
    """A one-shard index of ``weights`` (every key stored in it; aliases left out, as transformers leaves out tied
    weights), by the name ``transformers.Trainer`` looks for when it resumes or loads the best checkpoint."""
    return _json_bytes({"weight_map": {key: weights for key in keys},
                        "moefy": f"{NOT_DENSE}; transformers.Trainer loads {weights} into the moefied model it trains"})


def _is_commit_record(path: str) -> bool:
    """Whether ``path`` is a ``moefy.json`` that names what it commits (format 2): one of format 1 does not, so a
    save removes it before replacing the weights, lest the old description load with the new weights."""
    try:
        if os.path.islink(path) or os.path.getsize(path) > (8 << 20):
            return False
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (FileNotFoundError, ValueError, RecursionError):  # another OSError: the save fails, the folder intact
        return False
    return isinstance(meta, dict) and meta.get("format_version") == FORMAT_VERSION and isinstance(
        meta.get("files"), dict)


def _stale(folder: str, keep: List[str]) -> List[str]:
    """The files of ``folder`` that ``from_pretrained`` or ``Trainer`` would load instead of what this save writes:
    dense weights, their shards and indexes, and the Trainer index of the other weights format."""
    names = os.listdir(folder)
    stale = [n for n in names if n in DENSE_WEIGHTS or DENSE_SHARD.fullmatch(n)
             or n in TRAINER_INDEX_NAMES.values()]
    return [n for n in stale if n not in keep]


def save(model: nn.Module, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write ``model``'s weights and ``moefy.json`` (every conversion, for :func:`moefy.load`) into ``folder``,
    crash-safe: a kill or an ``OSError`` at any point leaves the folder's previous checkpoint loadable exactly, or
    a folder that fails to load naming what is incomplete, never a mix of two saves.

    Args:
        model: a moefied model (or any module: then ``moefy.json`` lists no conversion).
        folder: created if missing. Files ``from_pretrained`` / ``Trainer`` would load instead (a dense
            ``model.safetensors``, ``pytorch_model.bin``, their shards and indexes) are removed.
        state_dict: the weights to write, with ``model.state_dict()``'s keys (what Trainer passes to
            ``save_pretrained`` after gathering them); default ``model.state_dict()``.
    Returns:
        the path of the weights file written: ``moefy.safetensors`` with the ``safetensors`` package
        (``pip install moefy[save]``), else ``moefy.pt`` (``torch.save`` of the state dict). A Hugging Face
        model's ``config.json`` and a Trainer index are written next to it.
    """
    check_model(model)
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    entries = describe(model)
    state = model.state_dict()
    if state_dict is not None:
        if not isinstance(state_dict, Mapping) or set(state_dict) != set(state):
            raise ValueError("state_dict must be a dict with exactly model.state_dict()'s keys")
        state = state_dict
    tensors, aliases = _tensors(state)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    name = SAFETENSORS_NAME if _has_safetensors() else TORCH_NAME
    hf_config = getattr(model, "config", None)
    hf = callable(getattr(hf_config, "save_pretrained", None))
    with FolderWrite(folder) as write:
        tmp = write.add(name, functools.partial(_write_weights, tensors, name=name, save_id=write.token))
        record = {"bytes": os.path.getsize(tmp)}
        record.update({"save_id": write.token} if name == SAFETENSORS_NAME else {"sha256": sha256(tmp)})
        files = {name: record}
        if hf:
            for file, data in (("config.json", _hf_config_bytes(hf_config, type(model).__name__)),
                               (TRAINER_INDEX_NAMES[name], _trainer_index_bytes(name, list(tensors)))):
                write.add_bytes(file, data)
                files[file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {"format_version": FORMAT_VERSION, "weights": name, "files": files, "aliases": aliases,
                "conversions": entries}
        remove = _stale(folder, keep=list(files))
        if not _is_commit_record(os.path.join(folder, CONFIG_NAME)):
            remove.append(CONFIG_NAME)  # an old description must not meet the new weights after a crash
        write.add_bytes(CONFIG_NAME, _json_bytes(meta))
        write.commit(remove=remove)
    # after the commit: the other format's weights and what interrupted saves left (no loader reads them)
    remove_files(folder, [n for n in os.listdir(folder) if is_temp(n) or
                          (n in (SAFETENSORS_NAME, TORCH_NAME) and n != name)])
    return os.path.join(folder, name)


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
    check_model(model)
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.save_pretrained = functools.partial(_save_pretrained, model)
