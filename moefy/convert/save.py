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

Crash safety (:mod:`moefy.convert.writer`, :mod:`moefy.convert.atomic`): every file is written under a temporary
name, fsynced and renamed into place, ``moefy.json`` last as the commit record; it names the weights file with its
size and the save's id (in the safetensors header) or its sha256, and ``config.json`` / the Trainer index with their
sha256. A kill or an ``OSError`` at any point of a save leaves the previous checkpoint loading exactly, or a folder
that fails to load naming the file that does not match; never the weights of one save with the description of
another. A save removes the files ``from_pretrained`` / Trainer would load instead (dense ``model.safetensors``,
``pytorch_model.bin``, their shards and indexes).

Untrusted folders (:mod:`moefy.convert.folder`, :mod:`moefy.convert.loader`, :func:`moefy.hf.load`): no code from
the folder runs, no file outside it is read, every size it declares is checked against the weights' header before
anything is allocated, every malformed field is a one-line ``ValueError`` naming the file and the field, and a
failed load leaves the base model unchanged.

This module is the public home of :func:`save` and :func:`load`; the layers under it import nothing from
``moefy.hf`` (``HFMoEBlock`` is registered in :mod:`moefy.convert.recorded`).
"""
from __future__ import annotations

from .loader import load
from .writer import (CONFIG_NAME, FORMAT_VERSION, NOT_DENSE, SAFETENSORS_NAME, TORCH_NAME, TRAINER_INDEX_NAMES,
                     describe, keep_save_pretrained, save)

__all__ = ["save", "load", "describe", "keep_save_pretrained"]
