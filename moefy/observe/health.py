"""Routing health: how balanced and how alive one MoE layer's experts are, as pure functions of its counts, and
the collapse alarm that watches them.

Every metric reads the load of the E real experts only, ``load[e]`` = assignments expert e processed (over one
recorded batch or over all of them): null-expert columns (copy, constant, zero) and the hole are router columns,
not experts, and are left out; non-finite tokens are in no count. With ``L`` the (E,) load, ``m = ΣL / E``:

- ``max_vio(L) = max_e L[e] / m − 1`` (MaxVio, Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"):
  0 = perfectly balanced, E − 1 = one expert took everything.
- ``load_cv(L) = sqrt(Σ_e (L[e] − m)² / E) / m``: coefficient of variation (population std), 0 … sqrt(E − 1).
- ``load_entropy(L) = −Σ_e f[e] log f[e]``, ``f = L / ΣL`` (0 log 0 = 0), nats: the entropy of the mean load
  distribution, log E = uniform, 0 = collapsed onto one expert. Not the router's *token* entropy (the mean over
  tokens of the entropy of each token's routing probabilities, :attr:`LayerStats.entropy`): a sharp router has
  a low token entropy and can still spread its load evenly.
- ``dead_experts(L)``: the experts with ``L[e] == 0``.

Each is None (``dead_experts``: every expert) when no expert got a token.

:class:`HealthThresholds` sets the bounds of a collapse alarm; :class:`HealthAlarm` checks a layer's batches
against them and logs a warning on ``logging.getLogger("moefy.observe.health")`` when a layer crosses one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["max_vio", "load_cv", "load_entropy", "dead_experts", "mean_defined", "LayerHealth", "model_health",
           "HealthThresholds", "HealthAlarm", "Crossing"]


def _loads(load) -> List[float]:
    """``load`` (a sequence or a 1-D tensor of E ≥ 1 numbers ≥ 0) as Python floats (exact for counts < 2**53)."""
    values = load.tolist() if hasattr(load, "tolist") else list(load)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"load must be a non-empty sequence of counts >= 0 (one per real expert), got {values!r:.80}")
    return [float(v) for v in values]


def max_vio(load) -> Optional[float]:
    """MaxVio of the (E,) expert load: ``max(load) / mean(load) − 1``; None when the load is all zero."""
    values = _loads(load)
    total = math.fsum(values)
    return max(values) * len(values) / total - 1.0 if total else None


def load_cv(load) -> Optional[float]:
    """Coefficient of variation of the (E,) expert load, ``std / mean`` (population std); None when all zero."""
    values = _loads(load)
    total = math.fsum(values)
    if not total:
        return None
    mean = total / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)) / mean


def load_entropy(load) -> Optional[float]:
    """Entropy in nats of the load distribution ``load / sum(load)`` over the E experts (log E = uniform);
    None when all zero."""
    values = _loads(load)
    total = math.fsum(values)
    if not total:
        return None
    return max(0.0, -math.fsum(v / total * math.log(v / total) for v in values if v))


def dead_experts(load) -> List[int]:
    """Ids of the experts of the (E,) load that got no token."""
    return [e for e, v in enumerate(_loads(load)) if v == 0]


def mean_defined(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None (nor NaN); None if there is none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class LayerHealth:
    """The health of one MoE layer over the batches recorded since the last reset (the *global batch*).

    Attributes:
        num_experts: E, real experts (null columns and the hole are not experts).
        max_vio: MaxVio of the load summed over the global batch (None: no expert got a token).
        max_vio_batch: mean over the recorded batches (forwards) of each batch's own MaxVio.
        dead: experts that got no token over the global batch.
        cv: coefficient of variation of the global batch's load.
        load_entropy: entropy (nats) of the global batch's load distribution over the experts.
        token_entropy: mean over the routed finite tokens of the entropy (nats) of each token's routing
            probabilities over all E' router columns (the log's ``entropy``).
    """

    num_experts: int
    max_vio: Optional[float]
    max_vio_batch: Optional[float]
    dead: Tuple[int, ...]
    cv: Optional[float]
    load_entropy: Optional[float]
    token_entropy: Optional[float]

    @property
    def dead_fraction(self) -> float:
        """Dead experts over E."""
        return len(self.dead) / self.num_experts

    @classmethod
    def of(cls, load, batch_max_vio: Sequence[Optional[float]] = (),
           token_entropy: Optional[float] = None) -> "LayerHealth":
        """The health of a layer whose experts got ``load`` (E,) over the global batch, whose batches had the
        MaxVio values ``batch_max_vio``."""
        values = _loads(load)
        return cls(num_experts=len(values), max_vio=max_vio(values), max_vio_batch=mean_defined(batch_max_vio),
                   dead=tuple(dead_experts(values)), cv=load_cv(values), load_entropy=load_entropy(values),
                   token_entropy=None if token_entropy is None or math.isnan(token_entropy) else token_entropy)


def model_health(layers: Dict[str, LayerHealth]) -> dict:
    """The model's health over its MoE layers (name → :class:`LayerHealth`): ``max_vio_mean`` /
    ``max_vio_max`` (mean and max of the layers' global-batch MaxVio), ``max_vio_batch_mean``, ``dead`` (dead
    experts, all layers), ``experts`` (real experts, all layers), ``dead_fraction`` (their ratio) and
    ``worst_layer`` (the layer of ``max_vio_max``; None when no layer has a MaxVio)."""
    if not isinstance(layers, dict) or not all(isinstance(h, LayerHealth) for h in layers.values()):
        raise TypeError("layers must be a dict of layer name -> LayerHealth (RoutingRecorder.health())")
    vio = {name: h.max_vio for name, h in layers.items() if h.max_vio is not None}
    dead, experts = sum(len(h.dead) for h in layers.values()), sum(h.num_experts for h in layers.values())
    worst = max(vio, key=vio.get) if vio else None
    return {"max_vio_mean": mean_defined(list(vio.values())), "max_vio_max": vio.get(worst),
            "max_vio_batch_mean": mean_defined([h.max_vio_batch for h in layers.values()]),
            "dead": dead, "experts": experts, "dead_fraction": dead / experts if experts else None,
            "worst_layer": worst}


# ---------------------------------------------------------------------------------------------- the alarm
@dataclass(frozen=True)
class HealthThresholds:
    """Bounds of a healthy layer for the collapse alarm; None (the default) leaves a metric unchecked.

    The alarm reads each recorded batch (one forward of the layer) on its own: a batch is *beyond* a bound when
    ``max_vio > max_vio``, ``load_cv > max_cv``, ``len(dead) / E > dead_fraction`` or
    ``load_entropy < min_load_entropy`` for that batch's load. A batch with fewer token slots than experts has
    dead experts by construction: set the bounds for your batch size.

    Attributes:
        max_vio: the largest healthy MaxVio (e.g. 1.0: no expert above twice the mean load).
        max_cv: the largest healthy coefficient of variation of the load.
        dead_fraction: the largest healthy fraction of experts without a token in a batch (0: any dead expert).
        min_load_entropy: the smallest healthy load entropy, in nats (log E is uniform).
    """

    max_vio: Optional[float] = None
    max_cv: Optional[float] = None
    dead_fraction: Optional[float] = None
    min_load_entropy: Optional[float] = None

    def __post_init__(self):
        for name, value in vars(self).items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "dead_fraction" and value > 1):
                allowed = "a number in [0, 1]" if name == "dead_fraction" else "a finite number >= 0"
                raise ValueError(f"HealthThresholds.{name} must be None or {allowed}, got {value!r:.60}")

    @property
    def active(self) -> bool:
        """Whether any bound is set."""
        return any(v is not None for v in vars(self).values())

    def beyond(self, load) -> Dict[str, Tuple[float, float]]:
        """The bounds the (E,) batch ``load`` is beyond: metric name → (value, bound)."""
        values = _loads(load)
        measured = {"max_vio": (max_vio(values), self.max_vio, 1), "max_cv": (load_cv(values), self.max_cv, 1),
                    "dead_fraction": (len(dead_experts(values)) / len(values), self.dead_fraction, 1),
                    "min_load_entropy": (load_entropy(values), self.min_load_entropy, -1)}
        return {name: (value, bound) for name, (value, bound, sign) in measured.items()
                if bound is not None and value is not None and sign * (value - bound) > 0}


@dataclass(frozen=True)
class Crossing:
    """One crossing of a bound: ``layer``'s batch number ``batch`` (its forwards since the recorder's last
    reset) measured ``value`` for ``metric``, beyond ``bound``."""

    layer: str
    batch: int
    metric: str
    value: float
    bound: float


METRIC_NAMES = {"max_vio": "MaxVio", "max_cv": "load CV", "dead_fraction": "dead-expert fraction",
                "min_load_entropy": "load entropy (nats)"}


@dataclass
class HealthAlarm:
    """Checks each recorded batch of each layer against ``thresholds`` and logs one warning when a layer
    *crosses* a bound (its previous batch was within it, or it is the layer's first batch): a layer that stays
    beyond is not warned about again until it has come back within the bound (logged at INFO) and crossed
    again. Every crossing is kept in :attr:`crossings`.
    """

    thresholds: HealthThresholds
    crossings: List[Crossing] = field(default_factory=list)
    _beyond: Dict[str, frozenset] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.thresholds, HealthThresholds):
            raise TypeError(f"alarm must be a HealthThresholds (or None for no alarm), got "
                            f"{type(self.thresholds).__name__}")

    def check(self, layer: str, load, batch: int) -> List[Crossing]:
        """Check ``layer``'s batch number ``batch`` whose experts got ``load`` (E,); returns the new crossings
        (each also logged)."""
        beyond = self.thresholds.beyond(load)
        before = self._beyond.get(layer, frozenset())
        self._beyond[layer] = frozenset(beyond)
        new = [Crossing(layer, batch, name, value, bound) for name, (value, bound) in beyond.items()
               if name not in before]
        if new:
            self.crossings.extend(new)
            logger.warning("routing health: layer %r crossed %s at batch %d", layer, "; ".join(
                f"{METRIC_NAMES[c.metric]} {c.value:.4g} {'<' if c.metric.startswith('min') else '>'} "
                f"{c.metric}={c.bound:g}" for c in new), batch)
        back = sorted(before - set(beyond))
        if back:
            logger.info("routing health: layer %r is back within %s at batch %d", layer, ", ".join(back), batch)
        return new
