"""load(): a folder written by :func:`moefy.save` (or a moefied model's ``save_pretrained``) back into a model,
building the base from the ``config.json`` beside the weights, as PEFT's ``AutoPeftModel.from_pretrained`` does."""
from __future__ import annotations

import os

from torch import nn

from .families import transformers_module


def load(folder) -> nn.Module:
    """The moefied transformers model saved in ``folder``: its base class built from ``config.json`` (random
    weights, never downloaded), then :func:`moefy.load` (every conversion re-applied, every weight loaded strictly).

    Args:
        folder: written by :func:`moefy.save` from a transformers model (it holds ``config.json``).
    Returns:
        the model, in eval mode as ``from_pretrained`` returns one; every tensor in its saved dtype.
    """
    from ..convert.save import load as load_into
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"folder {os.fspath(folder)!r} has no config.json: it was not saved from a "
                                f"transformers model; build the base yourself and call moefy.load(base, folder)")
    transformers = transformers_module()
    config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(config, "transformers_weights"):  # moefy.save's guard against a dense from_pretrained of folder
        del config.transformers_weights
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"folder {os.fspath(folder)!r}: config.json names no transformers class (architectures="
                         f"{names!r}); build the base yourself and call moefy.load(base, folder)")
    return load_into(cls(config), folder).eval()
