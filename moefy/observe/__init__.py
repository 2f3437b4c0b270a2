"""Observation: routing statistics over many batches and the JSON-lines training log.

- ``recorder``: :class:`RoutingRecorder`, which hooks every MoEBlock of a model, and its per-layer stats.
- ``health``: routing health (MaxVio, dead experts, load CV and entropy) of counts, and the collapse alarm.
- ``log``: the training log's writer (:class:`TrainingLogWriter`) and strict parser (:func:`read_log`).
- ``cli``: the ``moefy`` command (``moefy plot LOG --out DIR``); not imported here, so that
  ``python -m moefy.observe.cli`` runs without a double import.
"""
from .log import (MAX_ABS, MAX_EPOCH, REQUIRED, ROUTING_FIELDS, LayerSeries, LogFormatError, LogLimitError, LogLimits,
                  PathLike, TrainingLog, TrainingLogWriter, log_entry, read_log)
from .health import Crossing, HealthThresholds, LayerHealth, model_health
from .recorder import LayerStats, RoutingRecorder, labels_per_token, layer_summary, token_entropy

__all__ = [
    "RoutingRecorder", "LayerStats", "token_entropy", "labels_per_token", "layer_summary",
    "HealthThresholds", "LayerHealth", "Crossing", "model_health",
    "TrainingLogWriter", "TrainingLog", "LayerSeries", "LogFormatError", "LogLimits", "LogLimitError", "log_entry",
    "read_log",
    "REQUIRED", "ROUTING_FIELDS", "MAX_EPOCH", "MAX_ABS", "PathLike",
]
