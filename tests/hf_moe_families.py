"""Tiny random models of every text MoE family transformers ships, for the tests (a helper, not a test file).

Each family is built from its default config (``AutoConfig.for_model(model_type, **overrides)``) scaled down:
hidden 32, 4 heads of 8, 2 decoder layers (at least one of them a MoE layer), 8 experts or fewer, top-k the
default's up to E / 2, vocabulary 128, every intermediate size 32; random weights, eval mode, float32. Sizes the
default config leaves unset, or that must agree with each other (group-limited routing, hybrid layer patterns,
mamba heads), are set per family in :data:`FAMILY_OVERRIDES`. Families that cannot run here are listed in
:data:`SKIPPED` with the reason.

    from hf_moe_families import FAMILIES, tiny_model, survey
    model = tiny_model("mixtral")          # built once per process (module-level cache), eval mode
    ids = tiny_input_ids()                 # (2, 6) token ids

Nothing here downloads: transformers builds every model from its config.
"""
from __future__ import annotations

import functools
import glob
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import transformers
import transformers.integrations.moe
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
HIDDEN = 32
LAYERS = 2
MAX_EXPERTS = 8

_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")

# model_type → config fields set on top of the generic scaling (why, in the comment).
FAMILY_OVERRIDES: Dict[str, dict] = {
    # default leaves the MoE sizes unset (None): DeepSeek-V2-Lite's routing, scaled
    "deepseek_v2": {"num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy"},
    "longcat_flash": {"zero_expert_num": 2},
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},  # one hash-routed, one top-k layer (default 3 hash)  # zero experts (identity) beside the 8 real ones; default 256
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # default is one expert, head_dim None
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2, "head_dim": 8},
    # default layer_types None; two conv layers first (num_dense_layers=2) would leave no MoE layer
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # hybrids: two layers must keep one attention layer (the cache needs one) and one MoE layer
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
                         "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "use_mamba_kernels": False, "mamba_dt_rank": 8},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                    "linear_num_heads": 4, "linear_head_dim": 8},
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                       "linear_num_heads": 4, "linear_head_dim": 8, "num_expert_group": 2, "topk_group": 1,
                       "expert_swiglu_limit_list": [0, 0], "share_expert_swiglu_limit_list": [0, 0]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16,
                         "mamba_d_state": 16, "mamba_chunk_size": 16},
    # layer 0 dense, layer 1 MoE (defaults: dense first layers that leave no MoE layer in two)
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "flint": {"mlp_only_layers": [0]},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # transformers reads both
             "ffn_config": {"hidden_size": HIDDEN, "ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
             "d_model": HIDDEN, "n_heads": 4, "n_layers": LAYERS, "max_seq_len": 64},
    "doge": {"is_moe": True, "num_experts": 4, "num_experts_per_tok": 2},  # product keys: E must be a square
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 2, "mlp_only_layers": [0], "index_topk": 16,
                   "index_pool_size": 64, "index_compression": 4, "index_num_local_tokens": 4,
                   "index_num_sink_tokens": 2},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "indexed_attention"], "linear_num_key_heads": 2,
                       "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                       "hc_lowrank": 8, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    "gemma4_text": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
                    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "per_layer_config": {}},
}

# model_type → why it is not built here.
SKIPPED: Dict[str, str] = {}


@dataclass
class Family:
    """One text MoE family: its ``model_type``, causal-LM class name, the modeling file's folder and whether
    that file runs its experts through ``@use_experts_implementation``."""

    model_type: str
    causal_lm: str
    folder: str
    uses_experts_implementation: bool


def _models_root() -> str:
    return os.path.join(os.path.dirname(transformers.__file__), "models")


@functools.lru_cache(maxsize=None)
def _families() -> Tuple[Family, ...]:
    """Every causal-LM class (``*ForCausalLM`` in transformers' auto mapping) defined in a modeling file that
    has a MoE layer: experts under ``@use_experts_implementation``, or a router with ``num_experts`` /
    ``n_routed_experts`` / ``num_local_experts`` and a ``router_logits`` output. Read from the sources, without
    importing the modeling modules (cheap at test collection). A class mapped from two model types
    (``qwen3_5_moe`` and ``qwen3_5_moe_text``) takes the ``_text`` one: its config class is the text config;
    :func:`tiny_model` checks that."""
    by_class: Dict[str, List[str]] = {}
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if isinstance(cls, str) and cls.endswith("ForCausalLM"):
            by_class.setdefault(cls, []).append(model_type)
    found: Dict[str, Family] = {}
    for path in sorted(glob.glob(os.path.join(_models_root(), "*", "modeling_*.py"))):
        with open(path, encoding="utf-8") as file:
            src = file.read()
        uses = "@use_experts_implementation" in src
        if not uses and not (re.search(r"num_experts|n_routed_experts|num_local_experts", src)
                             and "router_logits" in src):
            continue
        for cls in re.findall(r"^class (\w+ForCausalLM)\b", src, re.M):
            if cls in by_class and cls not in found:
                types = sorted(by_class[cls], key=lambda t: (not t.endswith("_text"), t))
                found[cls] = Family(types[0], cls, os.path.basename(os.path.dirname(path)), uses)
    return tuple(sorted(found.values(), key=lambda f: f.model_type))


FAMILIES: Dict[str, Family] = {}


def families() -> Dict[str, Family]:
    """model_type → :class:`Family`, every text MoE family of the installed transformers (built on first use)."""
    if not FAMILIES:
        FAMILIES.update((f.model_type, f) for f in _families())
    return FAMILIES


def scaled_overrides(model_type: str) -> dict:
    """The config fields that scale ``model_type``'s default config down (generic rules, then the family's
    :data:`FAMILY_OVERRIDES`)."""
    d = AutoConfig.for_model(model_type).to_dict()

    def has(key):
        return d.get(key) is not None

    out = {}
    for key in ("num_hidden_layers", "num_layers"):
        if has(key):
            out[key] = LAYERS
    if has("hidden_size"):
        out["hidden_size"] = HIDDEN
    if has("num_attention_heads"):
        out["num_attention_heads"] = 4
    if has("num_key_value_heads"):
        kv, heads = d["num_key_value_heads"], d.get("num_attention_heads")
        out["num_key_value_heads"] = 1 if kv == 1 else 4 if kv == heads else 2
    if has("head_dim"):
        out["head_dim"] = 8
    for key, value in d.items():
        if isinstance(value, int) and not isinstance(value, bool) and (
                "intermediate_size" in key or "ffn_hidden_size" in key):
            out[key] = 32
    experts = None
    for key in _EXPERT_COUNTS:
        if isinstance(d.get(key), int) and not isinstance(d[key], bool):
            experts = min(d[key], MAX_EXPERTS)
            out[key] = experts
    for key in _TOP_K:
        if isinstance(d.get(key), int) and not isinstance(d[key], bool):
            out[key] = min(d[key], max(1, (experts or MAX_EXPERTS) // 2))
    for group in ("n_group", "num_expert_group"):
        if isinstance(d.get(group), int) and d[group] > 1:  # group-limited top-k: 2 groups of 4, 1 kept
            out[group] = 2
            if has("topk_group"):
                out["topk_group"] = 1
    if isinstance(d.get("first_k_dense_replace"), int) and d["first_k_dense_replace"] > 0:
        out["first_k_dense_replace"] = 1  # layer 0 dense, layer 1 MoE
    if has("decoder_sparse_step"):
        out["decoder_sparse_step"] = 1
    if has("vocab_size"):
        out["vocab_size"] = VOCAB
    for key in ("q_lora_rank", "kv_lora_rank"):
        if has(key):
            out[key] = 16
    for key in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if has(key):
            out[key] = 8
    for key, value in d.items():  # special token ids must index the small vocabulary
        if key.endswith("token_id") and isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
            out[key] = VOCAB - 1
    out.update(FAMILY_OVERRIDES.get(model_type, {}))
    return out


def tiny_config(model_type: str):
    """The scaled-down config of ``model_type`` (eager attention)."""
    cfg = AutoConfig.for_model(model_type, **scaled_overrides(model_type))
    cfg._attn_implementation = "eager"
    return cfg


_MODELS: Dict[str, torch.nn.Module] = {}
_ERRORS: Dict[str, str] = {}


def tiny_model(model_type: str) -> torch.nn.Module:
    """The tiny random model of ``model_type`` in eval mode, built once per process (seed 0). Raises
    ``RuntimeError`` with the reason for a family that does not build here."""
    if model_type in SKIPPED:
        raise RuntimeError(f"{model_type}: skipped ({SKIPPED[model_type]})")
    if model_type in _ERRORS:
        raise RuntimeError(_ERRORS[model_type])
    if model_type not in _MODELS:
        family = families()[model_type]
        try:
            with warnings.catch_warnings(), _quiet_transformers():
                warnings.simplefilter("ignore")
                model_class = getattr(transformers, family.causal_lm)
                if model_class.config_class.model_type != model_type:
                    raise ValueError(f"{family.causal_lm} takes a {model_class.config_class.model_type!r} config")
                torch.manual_seed(0)
                model = model_class(tiny_config(model_type)).eval()
        except Exception as err:  # noqa: BLE001 - recorded as the family's reason
            _ERRORS[model_type] = f"{model_type}: does not build ({type(err).__name__}: {err})"
            raise RuntimeError(_ERRORS[model_type]) from err
        _MODELS[model_type] = model
    return _MODELS[model_type]


def tiny_input_ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids in [3, VOCAB - 1) (clear of the usual special ids)."""
    return torch.randint(3, VOCAB - 1, (batch, length), generator=torch.Generator().manual_seed(seed))


class _quiet_transformers:
    """Silence transformers' logger while building (init warnings about unused config fields)."""

    def __enter__(self):
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


# ---------------------------------------------------------------------------------------------- survey
def is_experts_implementation(module: torch.nn.Module) -> bool:
    """Whether ``module``'s class, or a base class (Ergo's experts subclass one), is decorated with
    transformers' ``@use_experts_implementation`` (the decorator's ``forward`` wraps the class's own)."""
    decorated = inspect.getsourcefile(transformers.integrations.moe.use_experts_implementation)
    for cls in type(module).__mro__:
        forward = cls.__dict__.get("forward")
        if getattr(forward, "__wrapped__", None) is not None and forward.__code__.co_filename == decorated:
            return True
    return False


def survey(model_type: str) -> dict:
    """What the tiny model of ``model_type`` is made of: whether it builds and runs a forward here, its MoE
    layers as :func:`moefy.observe.hf_routing.hf_moe_layers` finds them (block, experts and router class names,
    how the routing is read), and the reason when it does not build."""
    from moefy.observe.hf_routing import hf_moe_layers
    family = families()[model_type]
    row = {"model_type": model_type, "causal_lm": family.causal_lm,
           "uses_experts_implementation": family.uses_experts_implementation}
    try:
        model = tiny_model(model_type)
        with torch.no_grad():
            model(input_ids=tiny_input_ids())
    except Exception as err:  # noqa: BLE001
        return {**row, "builds": False, "reason": str(err)[:300]}
    layers, skipped = hf_moe_layers(model)

    def names(attr):
        return sorted({type(getattr(layer, attr)).__name__ for layer in layers})

    return {**row, "builds": True, "moe_layers": len(layers), "block": names("block"), "experts": names("experts"),
            "router": names("router"), "reader": sorted({layer.reader for layer in layers}), "skipped": skipped}


if __name__ == "__main__":  # the survey as a markdown table: python tests/hf_moe_families.py [model_type ...]
    import sys
    torch.set_num_threads(1)
    print("| family | causal LM | builds | MoE layers | MoE block | experts | router | read as | "
          "@use_experts_implementation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mt in sys.argv[1:] or families():
        r = survey(mt)
        if not r["builds"]:
            print(f"| {mt} | {r['causal_lm']} | no: {r['reason']} | | | | | | |")
            continue
        print(f"| {mt} | {r['causal_lm']} | yes | {r['moe_layers']} | {', '.join(r['block'])} | "
              f"{', '.join(r['experts'])} | {', '.join(r['router'])} | {', '.join(r['reader'])} | "
              f"{'yes' if r['uses_experts_implementation'] else 'no'} |")
