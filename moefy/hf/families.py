"""The Hugging Face MoE architectures moefy reads and writes, as one table.

Each :class:`MoEFamily` says where a transformers MoE model keeps its mixtures, how its router routes (as
:class:`~moefy.config.RoutingConfig` fields, from the model's config), what its shared expert is, and which
dense architectures export to it. Import (:mod:`moefy.hf.from_hf`) and export (:mod:`moefy.hf.export`) read
the same table, so a block imported from a family routes exactly as the family's config says, and a block
exports to a family only if it routes that way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

Options = Dict[str, Any]


def _softmax_top_k(cfg) -> Options:
    """Qwen2-MoE, Qwen3-MoE, OLMoE, ...: softmax over all experts, top-k, renormalised if norm_topk_prob."""
    return {"k": cfg.num_experts_per_tok, "normalize": bool(getattr(cfg, "norm_topk_prob", True))}


def _renormalised(cfg) -> Options:
    """Mixtral, MiniMax, Granite-MoE (its softmax over the top-k logits is the same): softmax top-k, renormalised."""
    return {**_softmax_top_k(cfg), "normalize": True}


def _not_renormalised(cfg) -> Options:
    """Jamba: softmax over all experts, top-k, the k probabilities as they are."""
    return {**_softmax_top_k(cfg), "normalize": False}


def _deepseek_v3(cfg) -> Options:
    """DeepSeek-V3 (GLM-4-MoE, dots1, ...): sigmoid scores, selection bias, group-limited top-k, routed scaling
    factor."""
    return {"k": cfg.num_experts_per_tok, "normalize": bool(cfg.norm_topk_prob), "score_func": "sigmoid",
            "selection_bias": True, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
            "routed_scaling_factor": float(cfg.routed_scaling_factor)}


@dataclass(frozen=True)
class MoEFamily:
    """One transformers MoE architecture.

    Attributes:
        model_type: its ``config.model_type`` (``"mixtral"``).
        name: its class-name prefix (``"Mixtral"``: ``MixtralForCausalLM``, ``MixtralConfig``, ...).
        block: the class name of its MoE block (``"MixtralSparseMoeBlock"``), found at ``layers.<i>.mlp``.
        routing: its config → the RoutingConfig fields its router computes with.
        shared: None (no shared expert), ``"gated"`` (Qwen2-MoE: ``shared_expert`` times
            ``sigmoid(shared_expert_gate(x))``) or ``"plain"`` (DeepSeek-V3: ``shared_experts``, no gate).
        num_experts: its config's field for the number of routed experts.
        expert_hidden: its config's field for an expert's hidden size.
        dense: the ``model_type`` of the dense architectures that export to it (one MoE per decoder MLP).
        router: the block's router attribute (``gate`` or ``router``): its ``weight`` (E, D), and
            ``e_score_correction_bias`` (E,) with ``selection_bias``.
        mlp: the decoder layer's attribute that holds the block (``mlp``, Jamba's ``feed_forward``, ...).
    """

    model_type: str
    name: str
    block: str
    routing: Callable[[Any], Options]
    shared: Optional[str]
    num_experts: str
    expert_hidden: str
    dense: Tuple[str, ...] = ()
    router: str = "gate"
    mlp: str = "mlp"

    @property
    def shared_path(self) -> Optional[str]:
        """The shared expert's attribute in the HF block, or None."""
        return {"gated": "shared_expert", "plain": "shared_experts"}.get(self.shared)

    @property
    def partial(self) -> bool:
        """Whether some decoder layers may keep a dense MLP (``mlp_only_layers``)."""
        return self.model_type in ("qwen2_moe", "qwen3_moe")

    def routing_config(self, cfg):
        """The RoutingConfig of this family's router under ``cfg``."""
        from ..config import RoutingConfig
        return RoutingConfig(route="tokens", shared_gate=self.shared == "gated", **self.routing(cfg))


FAMILIES: Dict[str, MoEFamily] = {f.model_type: f for f in (
    MoEFamily("mixtral", "Mixtral", "MixtralSparseMoeBlock", _renormalised, None, "num_local_experts",
              "intermediate_size", dense=("llama", "mistral")),
    MoEFamily("qwen2_moe", "Qwen2Moe", "Qwen2MoeSparseMoeBlock", _softmax_top_k, "gated", "num_experts",
              "moe_intermediate_size", dense=("qwen2",)),
    MoEFamily("qwen3_moe", "Qwen3Moe", "Qwen3MoeSparseMoeBlock", _softmax_top_k, None, "num_experts",
              "moe_intermediate_size", dense=("qwen3",)),
    MoEFamily("olmoe", "Olmoe", "OlmoeSparseMoeBlock", _softmax_top_k, None, "num_experts",
              "intermediate_size"),
    MoEFamily("deepseek_v3", "DeepseekV3", "DeepseekV3MoE", _deepseek_v3, "plain", "n_routed_experts",
              "moe_intermediate_size"),
    # the same routers, shared experts and SwiGLU experts as one of the five above (tests/test_hf_import_all.py)
    MoEFamily("flex_olmo", "FlexOlmo", "FlexOlmoSparseMoeBlock", _softmax_top_k, None, "num_experts",
              "intermediate_size"),
    MoEFamily("minimax", "MiniMax", "MiniMaxSparseMoeBlock", _renormalised, None, "num_local_experts",
              "intermediate_size"),
    MoEFamily("granitemoe", "GraniteMoe", "GraniteMoeMoE", _renormalised, None, "num_local_experts",
              "intermediate_size", router="router", mlp="block_sparse_moe"),
    MoEFamily("jamba", "Jamba", "JambaSparseMoeBlock", _not_renormalised, None, "num_experts",
              "intermediate_size", router="router", mlp="feed_forward"),
    MoEFamily("qwen3_next", "Qwen3Next", "Qwen3NextSparseMoeBlock", _softmax_top_k, "gated", "num_experts",
              "moe_intermediate_size"),
    MoEFamily("qwen3_5_moe_text", "Qwen3_5Moe", "Qwen3_5MoeSparseMoeBlock", _softmax_top_k, "gated", "num_experts",
              "moe_intermediate_size"),
    *(MoEFamily(model_type, name, block, _deepseek_v3, shared, experts, "moe_intermediate_size")
      for model_type, name, block, shared, experts in (
          ("glm4_moe", "Glm4Moe", "Glm4MoeMoE", "plain", "n_routed_experts"),
          ("glm4_moe_lite", "Glm4MoeLite", "Glm4MoeLiteMoE", "plain", "n_routed_experts"),
          ("glm_moe_dsa", "GlmMoeDsa", "GlmMoeDsaMoE", "plain", "n_routed_experts"),
          ("deepseek_v32", "DeepseekV32", "DeepseekV32MoE", "plain", "n_routed_experts"),
          ("dots1", "Dots1", "Dots1MoE", "plain", "n_routed_experts"),
          ("solar_open", "SolarOpen", "SolarOpenMoE", "plain", "n_routed_experts"),
          ("kimi_linear", "KimiLinear", "KimiLinearMoE", "plain", "num_experts"),
          ("mimo_v2_flash", "MiMoV2Flash", "MiMoV2FlashMoE", None, "n_routed_experts"))),
)}
DENSE = {dense: f for f in FAMILIES.values() for dense in f.dense}

# RoutingConfig fields that change no output of a trained model (training-time losses and updates, bookkeeping,
# execution), so export does not compare them; every other field must equal the target family's.
TRAINING_ONLY = ("aux_criterion", "bias_update_rate", "layer_id", "fused", "capacity_factor", "capacity",
                 "drop_policy", "feature_dim")


def transformers_module(moe_layout: bool = False):
    """The ``transformers`` package, or an ImportError that says how to install it. ``moe_layout``: also require
    transformers 5, whose MoE blocks keep their experts stacked (``experts.gate_up_proj`` / ``down_proj``), the
    layout :func:`~moefy.hf.from_hf` and :func:`~moefy.hf.export` read and write."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("moefy.hf needs transformers: pip install 'moefy[hf]'") from err
    major = int(transformers.__version__.split(".")[0])
    if moe_layout and major < 5:
        raise ImportError(f"moefy.hf.from_hf / export need transformers >= 5 (stacked MoE experts), found "
                          f"{transformers.__version__}: pip install -U 'transformers>=5'")
    return transformers


def family_of(model) -> MoEFamily:
    """The MoE family a transformers model is (an HF MoE model) or exports to (a dense one)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in DENSE:
        return DENSE[model_type]
    known = sorted(FAMILIES) + sorted(DENSE)
    raise ValueError(f"model: {type(model).__name__} (model_type {model_type!r}) has no native Hugging Face MoE "
                     f"architecture moefy can write; model types it knows: {known}")
