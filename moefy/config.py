"""The routing options of a mixture, as one validated, frozen config.

:class:`RoutingConfig` holds every routing option of :class:`~moefy.block.MoEBlock` except the structural
ones (``experts``, ``input_dim``, ``num_experts``). Each field is documented once, in its ``metadata``
(``"values"``: what it accepts, default first; ``"doc"``: what it means); :meth:`RoutingConfig.options_table`
renders them as the README's "Routing options" table. All checks and normalisation happen in
``__post_init__``; the one check that needs the number of experts is :meth:`RoutingConfig.check_columns`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .checks import check_bool, check_choice, check_int, check_number

NOISES = ("gumbel", "gaussian", "jitter", "simple")
AGGREGATIONS = ("sum", "mean")
ROUTES = ("tokens", "samples")
ROUTE_ALIASES = {"images": "samples"}  # the original MoEfy's name (re-exported by moefy.compat)
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
NULL_KINDS = ("copy", "constant", "zero")  # the null columns' order after the real experts (then the hole)
# the aux losses' names; moefy.routing.losses.AUX_LOSSES maps each to its function (same names, same order). Kept
# here, not read from there, so the config never imports the routing package (which imports the config)
AUX_LOSS_NAMES = ("entropy", "prob", "cv2", "switch", "z", "balance", "seq_balance", "global_switch")
# shown in a block's repr only when they differ from their defaults
_SUMMARY_EXTRAS = ("temperature", "score_func", "feature_dim", "fused", "selection_bias", "n_group", "topk_group",
                   "routed_scaling_factor", "shared_gate", "bias_update_rate", "null_experts")
AuxCriterion = Union[None, str, Sequence[str], Mapping[str, float]]


def _option(default: Any, values: str, doc: str) -> Any:
    """A config field: its default, what it accepts (default first) and what it means."""
    return field(default=default, metadata={"values": values, "doc": doc})


def _k_message(k: Any, columns: Optional[int], hole: bool, nulls: int = 0) -> str:
    top = columns if columns is not None else ("E + 1" if hole else "E")
    what = "experts" + (" + null experts" if nulls else "") + (" + hole" if hole else "")
    return f"k must be a number in [1, {top}] (the number of {what}), got {k!r}"


def _parse_null(null_experts: Any) -> Optional[Dict[str, int]]:
    """``null_experts`` → ``{kind: count}`` of the kinds with count ≥ 1, in :data:`NULL_KINDS` order (None if
    none)."""
    if null_experts is None:
        return None
    if not isinstance(null_experts, Mapping):
        raise TypeError(f"null_experts must be None or a mapping {{kind: count}} with kinds in {list(NULL_KINDS)}, "
                        f"got {type(null_experts).__name__}")
    unknown = sorted(str(n) for n in null_experts if n not in NULL_KINDS)
    if unknown:
        raise ValueError(f"null_experts: unknown kind(s) {unknown}; allowed: {list(NULL_KINDS)}")
    counts = {kind: check_int(null_experts[kind], f"null_experts[{kind!r}]", min=0)
              for kind in NULL_KINDS if kind in null_experts}
    counts = {kind: n for kind, n in counts.items() if n}
    return counts or None


def _parse_aux(aux_criterion: AuxCriterion) -> Dict[str, float]:
    """``aux_criterion`` → ``{loss name: coefficient}``; names must be in :data:`AUX_LOSS_NAMES`."""
    if aux_criterion is None:
        return {}
    if isinstance(aux_criterion, str):
        pairs = [(aux_criterion, 1.0)]
    elif isinstance(aux_criterion, (list, tuple)):
        pairs = [(name, 1.0) for name in aux_criterion]
    elif isinstance(aux_criterion, Mapping):
        pairs = list(aux_criterion.items())
    else:
        raise ValueError(f"aux_criterion must be None, a loss name, a list of names or {{name: coefficient}}, "
                         f"got {aux_criterion!r}")
    for name, _ in pairs:
        if not isinstance(name, str) or name not in AUX_LOSS_NAMES:
            raise ValueError(f"aux_criterion: unknown loss {name!r}; allowed: {sorted(AUX_LOSS_NAMES)}")
    return {name: check_number(coef, f"aux_criterion: coefficient of {name!r}", low=0, what="a number >= 0")
            for name, coef in pairs}


def _hashable(value: Any) -> Any:
    return tuple(sorted(value.items())) if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class RoutingConfig:
    """How a mixture routes: one validated, immutable set of routing options.

    Build it with keywords (``RoutingConfig(k=2, noise="gumbel")``) or :meth:`from_options`; each field's
    meaning is in its ``metadata`` and in :meth:`options_table` (the README's "Routing options" table).
    Bad values raise ValueError / TypeError naming the option. Normalised on construction: ``route="images"``
    becomes ``"samples"``, ``noise="none"`` and ``aux_criterion="none"`` become None, a token-choice ``k``
    becomes an int, a list of loss names a tuple, ``capacity_factor``, ``token_capacity_factor`` and
    ``temperature`` floats.
    """

    k: float = _option(1, "`1` … E'", "token choice: experts per token, an int (E' = E, plus the null experts "
                       "and one with a hole). Expert choice: average experts per token in the capacity, any "
                       "number in (0, E'].")
    hole: bool = _option(False, "`False`, `True`", "one extra router column, the last (E without "
                         "`null_experts`). A token slot routed there contributes zero and is counted in "
                         "`routing.dropped`; with `normalize`, its weight still takes part in the renormalisation "
                         "(a token half-sent to the hole gets half the output).")
    noise: Optional[str] = _option(None, "`None`, `'gumbel'`, `'gaussian'`, `'jitter'`, `'simple'`", "training only; eval "
                                   "routing is deterministic. `gumbel`: Gumbel(0,1) added to the logits (top-k "
                                   "then samples without replacement from the softmax). `gaussian`: Shazeer et al. "
                                   "2017, `x·W_g + ε·softplus(x·W_noise)`, a learned input-dependent std (W_noise "
                                   "starts at 0, std ≥ 0.01). `jitter`: Switch's multiplicative input jitter "
                                   "`U(0.99, 1.01)`. `simple`: the original MoEfy's SIMPLE sampler (Ahmed et al., "
                                   "ICLR 2023): each token's k experts are an exact sample of "
                                   "`p(S) ∝ Π_{i∈S} σ(θ_i) Π_{i∉S} (1 − σ(θ_i))` over the sets S of k columns, θ the logits over the "
                                   "temperature; the combine weights get the gradient of the exact inclusion "
                                   "marginals (token choice only).")
    aux_criterion: AuxCriterion = _option(None, "`None`, a name, a list, `{name: coef}`", "auxiliary losses "
                                          "(names in `moefy.routing.AUX_LOSSES`), summed with their coefficients "
                                          "into `block.aux_loss`; each one alone in `block.aux_losses`. Computed "
                                          "in train and eval. `'prob'` needs `noise='gaussian'` and token choice, "
                                          "`'seq_balance'` token choice.")
    aggregation: str = _option("sum", "`'sum'`, `'mean'`", "`sum`: `y_t = Σ_i w_ti f_i(x_t)`; `mean`: that sum "
                               "divided by the number of real experts that processed token t.")
    expert_choice: bool = _option(False, "`False`, `True`", "each expert takes its top-C tokens, "
                                  "`C = ceil(capacity_factor · T · k / E')` (or `capacity`), capped at T; combine "
                                  "weights are the raw scores. Tokens no real expert picked get zero output and "
                                  "are counted in `routing.dropped`. It is **non-causal**: which tokens an expert "
                                  "takes depends on the whole batch, so it leaks across positions in "
                                  "autoregressive models.")
    route: str = _option("tokens", "`'tokens'`, `'samples'`", "`tokens`: every vector of `x (..., D)` is routed. "
                         "`samples` (alias `'images'`): every sample of `x (B, ...)` is routed as a whole on its "
                         "mean feature vector, for experts that need the whole sequence or image (attention, "
                         "conv); `feature_dim` says where the D features are (`1` for NCHW).")
    layer_id: Optional[int] = _option(None, "`None`, an int ≥ 0", "the block's place in a bigger model, used in "
                                      "names, plots and logs.")
    capacity_factor: float = _option(1.0, "`1.0`, a number > 0", "expert-choice capacity factor in "
                                     "`C = ceil(capacity_factor · T · k / E')`.")
    capacity: Optional[int] = _option(None, "`None`, an int ≥ 1", "expert-choice capacity C (tokens per expert, "
                                      "capped at T); an explicit `capacity` wins over `capacity_factor`.")
    token_capacity_factor: Optional[float] = _option(None, "`None`, a number > 0", "token choice: `None` is "
                                                     "dropless. A number caps every real expert at `C = ceil("
                                                     "token_capacity_factor · T · k / E)` assignments (E real "
                                                     "experts, the hole not counted; capped at T; the hole has no "
                                                     "capacity), as Megatron-LM's `--moe-expert-capacity-factor`. "
                                                     "Assignments over it are not run and count in "
                                                     "`routing.dropped`; their combine weight is lost, the kept "
                                                     "ones are not renormalised (Switch, Megatron). Aux losses see "
                                                     "the picks before drops.")
    drop_policy: str = _option("probs", "`'probs'`, `'position'`", "with `token_capacity_factor`, which "
                               "assignments an over-full expert keeps (Megatron-LM's `--moe-token-drop-policy`): "
                               "`probs`: those with the highest router scores (ties: earlier tokens); "
                               "`position`: those of the earliest tokens, whichever of its k picks it is for "
                               "a token (Switch / GShard's batch order).")
    normalize: bool = _option(True, "`True`, `False`", "token choice: renormalise the k chosen scores to sum to 1 "
                              "(what keeps a mixture of identical experts exact). `False` keeps the raw scores, as "
                              "the original MoEfy did. At `k=1` the renormalised weight is the constant 1, so "
                              "moefy uses `p / stopgrad(p)`: value exactly 1, gradient of `p`, and the router "
                              "still learns.")
    temperature: float = _option(1.0, "`1.0`, a number > 0", "logits are divided by it before the score "
                                 "function.")
    score_func: str = _option("softmax", "`'softmax'`, `'sigmoid'`", "router scores: a softmax over the router "
                              "columns, or an independent sigmoid per column.")
    feature_dim: int = _option(-1, "`-1`, a dim of `x`", "with `route='samples'`, the dim of `x` that holds the "
                               "D features (`1` for NCHW).")
    fused: bool = _option(False, "`False`, `True`", "run the experts as one pass per layer over stacked weights "
                          "(`moefy.dispatch.fused`) instead of one `expert_forward` call each. Only for identical "
                          "plain `nn.Linear` experts, `nn.Sequential(Linear, activation, ..., Linear)` ones or SwiGLU "
                          "ones (`gate_proj`, `up_proj`, `down_proj`, `act_fn`: HF's `LlamaMLP`) and an "
                          "`expert_forward` that is just `expert(x)`; other experts raise ValueError. Same outputs "
                          "and gradients as unfused (to float rounding); calls with extra forward arguments, and "
                          "dispatch overrides, run unfused, as do experts wrapped after construction (PEFT, hooks, a "
                          "parametrization; one warning).")

    selection_bias: bool = _option(False, "`False`, `True`", "token choice: a router buffer "
                                   "`router.score_correction_bias` (E',), zeros, saved in the state dict, added to "
                                   "the scores for choosing the experts only; the combine weights (and "
                                   "`routing.probs`) stay the unbiased scores (DeepSeek-V3's "
                                   "`e_score_correction_bias`; moefy changes it only with `bias_update_rate`).")
    bias_update_rate: float = _option(0.0, "`0.0` (off), a number > 0", "with `selection_bias`: aux-loss-free "
                                      "load balancing (Wang et al. 2024, DeepSeek-V3). Every training forward "
                                      "counts the tokens each real expert picked (before capacity drops; not "
                                      "the hole, nor masked tokens); `moefy.routing.update_selection_bias(model)`, "
                                      "called after each `optimizer.step()`, moves each bias by "
                                      "`rate · sign(mean_load − load_i)` and zeroes the counts (its `group` "
                                      "all-reduces them across ranks). Eval forwards count nothing.")
    n_group: int = _option(1, "`1`, an int ≥ 1 dividing E", "token choice: group-limited routing "
                           "(DeepSeek-V3): the E experts form `n_group` groups of E/n_group; each token keeps its "
                           "`topk_group` best groups, scored by the sum of each group's top-2 (biased) scores, and "
                           "picks its top-k experts inside them. No hole, no `noise='simple'`.")
    topk_group: Optional[int] = _option(None, "`None` (all groups), an int in [1, n_group]", "groups each token "
                                        "keeps with `n_group > 1`; k must fit in them: "
                                        "`k ≤ topk_group · E / n_group`.")
    routed_scaling_factor: float = _option(1.0, "`1.0`, a number > 0", "every combine weight of the routed "
                                           "experts is multiplied by it, after `normalize` (DeepSeek-V3's "
                                           "`routed_scaling_factor`); shared experts are not scaled.")
    shared_gate: bool = _option(False, "`False`, `True`", "with shared experts: "
                                "`y = routed + sigmoid(x·w_g) · Σ_j shared_j(x)`, `w_g` a bias-free "
                                "`nn.Linear(D, 1)` on the block (`block.shared_expert_gate`), x the router's input "
                                "(Qwen2-MoE's `shared_expert_gate`); without it the shared outputs are added as they "
                                "are (DeepSeek-V3).")

    null_experts: Optional[Mapping[str, int]] = _option(
        None, "`None`, `{'copy': n, 'constant': n, 'zero': n}`", "token choice: MoE++'s zero-computation "
        "experts (Jin et al. 2024), extra router columns after the real experts, in the order copy, constant, "
        "zero (then the hole). `zero`: contributes nothing, its slots count in `routing.dropped` (the hole is one "
        "more zero column). `copy`: `w·x`. `constant`: `w·(α1·x + α2·v_j)`, `(α1, α2) = softmax(W_j·x)`, "
        "`v_j` (D,) and `W_j` (2, D) learned (`block.constant_experts`). Copy and constant need expert outputs "
        "of the input's shape (constant: `route='tokens'`); their slots count in `routing.null_slots`, and "
        "`sum(load) + null_slots + dropped == T·k`. Aux losses balance over all E' columns, null ones included; "
        "`aggregation='mean'` averages the real experts only.")

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalised values bypass __setattr__
        for flag in ("hole", "expert_choice", "normalize", "fused", "selection_bias", "shared_gate"):
            check_bool(getattr(self, flag), flag)
        set_("null_experts", _parse_null(self.null_experts))
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < float("inf"):
            raise ValueError(_k_message(k, None, self.hole))
        if not self.expert_choice:
            if int(k) != k:
                raise ValueError(f"k must be an int for token choice, got {k!r}")
            set_("k", int(k))
        noise = check_choice(self.noise, "noise", ("none",) + NOISES, optional=True)
        set_("noise", None if noise == "none" else noise)
        aux = self.aux_criterion  # stored as given, but "none" → None, list → tuple, mapping → a dict copy
        if isinstance(aux, str) and aux == "none":
            aux = None
        elif isinstance(aux, (list, Mapping)):
            aux = tuple(aux) if isinstance(aux, list) else dict(aux)
        set_("aux_criterion", aux)
        set_("_aux_weights", _parse_aux(aux))
        if self.noise == "simple" and self.expert_choice:
            raise ValueError("noise='simple' samples k experts per token: it needs token choice "
                             "(expert_choice=False)")
        if "prob" in self._aux_weights and (self.noise != "gaussian" or self.expert_choice):
            raise ValueError("aux_criterion 'prob' is Shazeer's smooth load estimator: it needs "
                             "noise='gaussian' and token choice (expert_choice=False)")
        if "seq_balance" in self._aux_weights and self.expert_choice:
            raise ValueError("aux_criterion 'seq_balance' counts each token's top-k: it needs token choice "
                             "(expert_choice=False)")
        check_choice(self.aggregation, "aggregation", AGGREGATIONS)
        if isinstance(self.route, str):
            set_("route", ROUTE_ALIASES.get(self.route, self.route))
        check_choice(self.route, "route", ROUTES)
        check_int(self.layer_id, "layer_id", min=0, optional=True)
        set_("capacity_factor", check_number(self.capacity_factor, "capacity_factor", low=0, low_open=True))
        check_int(self.capacity, "capacity", min=1, optional=True)
        set_("token_capacity_factor", check_number(self.token_capacity_factor, "token_capacity_factor", low=0,
                                                   low_open=True, optional=True))
        if self.token_capacity_factor is not None and self.expert_choice:
            raise ValueError("token_capacity_factor caps token choice; expert choice has its own capacity "
                             "(capacity_factor / capacity): use those with expert_choice=True")
        check_choice(self.drop_policy, "drop_policy", DROP_POLICIES)
        set_("temperature", check_number(self.temperature, "temperature", low=0, low_open=True,
                                         what="a positive finite number"))
        check_choice(self.score_func, "score_func", SCORE_FUNCS)
        check_int(self.feature_dim, "feature_dim", what="an int (a dim of x)", type_error=TypeError)
        self._check_groups()
        if self.null_experts and (self.expert_choice or self.n_group > 1):
            raise ValueError("null_experts are router columns a token picks: they need token choice "
                             "(expert_choice=False) without expert groups (n_group=1)")
        if self.null_experts and "constant" in self.null_experts and self.route != "tokens":
            raise ValueError("null_experts 'constant' adds a learned (D,) vector to a token's output: it needs "
                             "route='tokens'")

    @property
    def null_columns(self) -> Tuple[str, ...]:
        """The kind of each null router column, in column order (E, E+1, ...; the hole, if any, comes after)."""
        counts = self.null_experts or {}
        return tuple(kind for kind in NULL_KINDS for _ in range(counts.get(kind, 0)))

    @property
    def zero_columns(self) -> int:
        """Router columns at the end whose slots are dropped: the zero null experts plus the hole."""
        return (self.null_experts or {}).get("zero", 0) + int(self.hole)

    def _check_groups(self) -> None:
        """Selection bias, expert groups and the routed scaling factor."""
        check_int(self.n_group, "n_group", min=1)
        check_int(self.topk_group, "topk_group", min=1, max=self.n_group, optional=True,
                  what=f"an int in [1, n_group={self.n_group}]")
        object.__setattr__(self, "routed_scaling_factor", check_number(
            self.routed_scaling_factor, "routed_scaling_factor", low=0, low_open=True))
        if self.selection_bias and (self.expert_choice or self.noise == "simple"):
            raise ValueError("selection_bias biases each token's top-k choice: it needs token choice "
                             "(expert_choice=False; a per-expert bias does not change an expert's top-C tokens) "
                             "and a noise other than 'simple' (which samples the experts)")
        object.__setattr__(self, "bias_update_rate", check_number(
            self.bias_update_rate, "bias_update_rate", low=0, what="a number >= 0 (0 is off)"))
        if self.bias_update_rate > 0 and not self.selection_bias:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} moves the selection bias: it needs "
                             f"selection_bias=True")
        if self.n_group > 1 and (self.expert_choice or self.hole or self.noise == "simple"):
            raise ValueError(f"n_group={self.n_group}: group-limited routing is token choice over real experts: it "
                             f"needs expert_choice=False, hole=False and a noise other than 'simple'")

    def __hash__(self) -> int:  # a dict aux_criterion is hashed by its items
        return hash(tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def aux_weights(self) -> Dict[str, float]:
        """``{loss name: coefficient}`` of ``aux_criterion`` (a fresh dict; empty without aux losses)."""
        return dict(self._aux_weights)

    def check_columns(self, num_experts: int) -> int:
        """E' = ``num_experts`` + null experts + hole router columns, after checking that ``k`` fits in them (and, with expert
        groups, that ``n_group`` divides E and ``k`` fits in the ``topk_group`` kept groups)."""
        columns = check_int(num_experts, "num_experts", min=1) + len(self.null_columns) + int(self.hole)
        if self.k > columns:
            raise ValueError(_k_message(self.k, columns, self.hole, len(self.null_columns)))
        if self.n_group == 1:
            return columns
        if num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide the number of experts, got {num_experts} experts")
        groups = self.topk_group if self.topk_group is not None else self.n_group
        if self.k > groups * num_experts // self.n_group:
            raise ValueError(f"k={self.k} must fit in the kept groups: k <= topk_group * E / n_group = "
                             f"{groups} * {num_experts} / {self.n_group}")
        return columns

    @classmethod
    def from_options(cls, config: Optional[RoutingConfig] = None, **options: Any) -> RoutingConfig:
        """A config from keyword options, or ``config`` with the given options replaced."""
        if config is not None and not isinstance(config, RoutingConfig):
            raise TypeError(f"config must be a RoutingConfig or None, got {type(config).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown option(s) {unknown}; allowed: {allowed}")
        if config is None:
            return cls(**options)
        return dataclasses.replace(config, **options) if options else config

    def summary(self, num_experts: Optional[int] = None) -> str:
        """One line for a block's repr: layer, experts, hole, mode, noise, aux losses, aggregation, route,
        then any of temperature, score_func, feature_dim, fused and the DeepSeek-V3 / shared-expert options that
        differ from their defaults."""
        mode = (f"expert_choice(k={self.k}, capacity={self.capacity or f'{self.capacity_factor}x'})"
                if self.expert_choice else f"token_choice(k={self.k}, normalize={self.normalize}"
                + (f", capacity={self.token_capacity_factor}x, drop_policy={self.drop_policy})"
                   if self.token_capacity_factor is not None else ")"))
        parts = [f"layer_id={self.layer_id}"] + ([f"experts={num_experts}"] if num_experts is not None else [])
        parts += [f"hole={self.hole}", mode, f"noise={self.noise}", f"aux={self._aux_weights or None}",
                  f"aggregation={self.aggregation}", f"route={self.route}"]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        parts += [f"{name}={getattr(self, name)}" for name in _SUMMARY_EXTRAS if getattr(self, name) != defaults[name]]
        return ", ".join(parts)

    @classmethod
    def options_table(cls) -> str:
        """The markdown table of the options, one row per field, from the fields' metadata."""
        rows = ["| option | values (default first) | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            cells = (f"`{f.name}`", f.metadata["values"], f.metadata["doc"])
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(rows) + "\n"
