"""Hugging Face models in and out (optional extra ``pip install moefy[hf]``: transformers).

- :func:`from_hf`: the MoE blocks of a transformers MoE model as moefy blocks, in place, same logits: 59 of the 62
  text MoE families of transformers 5.25, 19 with their routing mapped onto RoutingConfig (:class:`HFMoEBlock`),
  the others keeping their own router with moefy's dispatch (:class:`HFExpertsBlock`, :mod:`moefy.hf.generic`).
- :func:`export`: a moefied Llama / Mistral / Qwen2 / Qwen3, or an imported model, as a native transformers
  MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE / its own class) that ``from_pretrained`` loads.
- :func:`load`: a folder :func:`moefy.save` wrote from a transformers model, its base built from its config.json
  (``moefy.save`` / ``moefy.load(base, folder)`` save and load any moefied model, HF or not).
- :func:`include_aux_loss`: ``outputs.loss`` includes moefy's aux losses (what ``transformers.Trainer`` trains).
- Upcycling BERT-style encoders and the offline MiniLM weights: :mod:`moefy.convert.hf`.
"""
from .aux import include_aux_loss
from .block import HFMoEBlock, SwiGLU
from .export import export
from .families import FAMILIES, MoEFamily
from .generic import HFExpertsBlock
from .from_hf import from_hf
from .load import load

__all__ = ["from_hf", "export", "load", "include_aux_loss", "HFMoEBlock", "HFExpertsBlock", "SwiGLU", "FAMILIES", "MoEFamily"]
