"""Conversion: clone a module, or chosen submodules of a model, into mixtures of their copies, and back to dense.

- ``mixture``: :class:`ModuleMixture`, :class:`AttentionMixture`.
- ``routes``: :func:`infer_routing` / :func:`explain_routing` (per token or per sample, probed where unknown).
- ``sources``: experts from several modules / models (``moefy(..., experts_from=...)``), the rest kept or averaged.
- ``router_init``: :func:`init_router`, router rows from the mean / k-means of each mixture's inputs (``kmeans``).
- ``surgery``: :func:`moefy` (one module, or every ``target`` submodule of a model in place), :func:`moefy_chain`.
- ``merge``: :func:`merge` a mixture into one dense module, :func:`unmoefy` a whole model.
- ``granular`` / ``drop_upcycling`` (on ``ffn_parts``): fine-grained upcycling (experts = slices of an FFN's
  hidden neurons) and drop-upcycling (re-initialised neurons), the ``granularity`` / ``split`` /
  ``drop_fraction`` options of :class:`ModuleMixture`.
- ``checkpoint``: :func:`dense_key_map`, :func:`load_dense_state_dict` (a dense checkpoint into a moefied model).
- ``save``: ``save`` / ``load`` a moefied model (weights + ``moefy.json``); top level only, as ``moefy.save``.
- ``hf``: upcycling Hugging Face BERT-style encoders (optional extra ``moefy[hf]``).
"""
from .checkpoint import dense_key_map, load_dense_state_dict
from .hf import INSTALL_HINT, encode, ffn_layers, load_bert, mean_pool, minilm_path, moefy_bert_ffn
from .merge import merge, unmoefy
from .mixture import AttentionMixture, ModuleMixture
from .kmeans import kmeans
from .router_init import init_router
from .routes import RouteChoice, explain_routing, infer_routing, probe_position_wise
from .surgery import Target, moefy, moefy_chain

__all__ = [
    "ModuleMixture", "AttentionMixture", "infer_routing", "explain_routing", "probe_position_wise", "RouteChoice", "moefy", "moefy_chain", "Target",
    "init_router", "kmeans", "merge", "unmoefy", "dense_key_map", "load_dense_state_dict",
    "INSTALL_HINT", "minilm_path", "load_bert", "ffn_layers", "moefy_bert_ffn", "mean_pool", "encode",
]
