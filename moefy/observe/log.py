"""JSON-lines training log (seed 004's format): a writer and a strict parser.

One JSON object a line, one line per epoch::

    {"epoch": 1, "routing_acc": 0.5841, "entropy": 1.4012,
     "utilization": [0.2257, 0.1031, 0.0735, 0.2797, 0.1871, 0.1309],
     "metrics": {"accuracy": 0.4356, "loss": 2.5902},
     "hole": false, "dropped": 0.0, "affinity": [[12, 0, 3, ...], ...],
     "layers": [{"layer": "blocks.0.mlp", "routing_acc": ..., "entropy": ..., "utilization": [...], ...}, ...]}

Required on every line: ``epoch`` (int ≥ 0, strictly increasing), ``routing_acc`` (number in [0, 1], or null
when trained without labels), ``entropy`` (number ≥ 0, mean router entropy in nats) and ``utilization`` (E'
numbers ≥ 0: fraction of assignments per router column, hole last; the same E' on every line).
Optional: ``metrics`` (name → number or null), ``hole`` (true: the last column is a hole), ``null_columns``
(the kinds, ``"copy"`` / ``"constant"`` / ``"zero"``, of the MoE++ null-expert columns that come after the
experts and before the hole; written only when there are some), ``dropped``
(fraction of token slots dropped), ``affinity`` (class × column assignment counts, E' columns) and ``layers``
(one object per MoE layer with ``layer`` (its name) and the same routing fields; the same layers on every
line). The top-level routing fields are those of
the first MoE layer, so a one-layer log is exactly seed 004's format.

Numbers are finite (no NaN / Infinity) and within ±1e300, epochs ≤ 2**53; names are valid Unicode. The file is
UTF-8 (a BOM is skipped) with ``\\n`` or ``\\r\\n`` line ends. The parser rejects the whole file on the first bad
line with a :class:`LogFormatError` naming the line.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..checks import check_path

REQUIRED = ("epoch", "routing_acc", "entropy", "utilization")
MAX_EPOCH = 2 ** 53  # epochs stay exact as floats (plot axes)
MAX_ABS = 1e300  # larger magnitudes overflow the arithmetic of plot axis limits
ROUTING_FIELDS = ("routing_acc", "entropy", "utilization", "hole", "null_columns", "dropped", "affinity")
NULL_KINDS = ("copy", "constant", "zero")  # as moefy.config.NULL_KINDS (this module reads logs without torch)
PathLike = Union[str, Path]


class LogFormatError(ValueError):
    """A training log that does not follow the format; ``str(err)`` is ``"PATH:LINE: what is wrong"``."""

    def __init__(self, path, line: Optional[int], message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


@dataclass
class LayerSeries:
    """One layer's routing fields over the epochs (aligned with :attr:`TrainingLog.epochs`).

    ``utilization`` is (epochs, E'); ``affinity`` is the last matrix logged, from epoch ``affinity_epoch``.
    """

    name: str
    routing_acc: List[Optional[float]] = field(default_factory=list)
    entropy: List[float] = field(default_factory=list)
    utilization: List[List[float]] = field(default_factory=list)
    dropped: List[Optional[float]] = field(default_factory=list)
    affinity: Optional[List[List[float]]] = None
    affinity_epoch: Optional[int] = None
    hole: bool = False
    null_columns: List[str] = field(default_factory=list)

    @property
    def num_columns(self) -> int:
        return len(self.utilization[0])


@dataclass
class TrainingLog:
    """A parsed log. ``layers`` holds every MoE layer of a multi-layer log; for a one-layer (seed) log it
    holds the top-level fields as one layer named ``"model"``. ``metrics[name]`` is aligned with
    ``epochs`` (None where a line lacks it)."""

    path: str
    epochs: List[int]
    layers: Dict[str, LayerSeries]
    metrics: Dict[str, List[Optional[float]]]


# ---------------------------------------------------------------------------------------------- writing
class TrainingLogWriter:
    """Appends one validated JSON line per :meth:`write` and flushes it (a crash loses nothing written).

    Args:
        path: the log file; created with its parent folder.
        mode: ``"w"`` to start a new log, ``"a"`` to append.
    """

    def __init__(self, path: PathLike, mode: str = "w"):
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = check_path(path, "path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, mode, encoding="utf-8")
        self._lines = 0

    def write(self, epoch: int, layers, metrics: Optional[Dict[str, float]] = None) -> dict:
        """Write the line of ``epoch``.

        Args:
            epoch: epoch number (strictly increasing).
            layers: a :class:`moefy.observe.recorder.RoutingRecorder` or its ``summary()`` (one dict per layer).
            metrics: name → number (accuracy, loss, ...).
        Returns:
            the object written.
        """
        summary = layers.summary() if hasattr(layers, "summary") else layers
        entry = log_entry(epoch, summary, metrics)
        self._lines += 1
        _check_entry(entry, self.path, self._lines, None)
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        return entry

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TrainingLogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_entry(epoch: int, layers: Sequence[dict], metrics: Optional[Dict[str, float]] = None) -> dict:
    """The log object of one epoch from per-layer summaries (:func:`moefy.observe.recorder.layer_summary`)."""
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence) or not all(
            isinstance(layer, Mapping) for layer in layers):
        raise TypeError(f"layers must be a RoutingRecorder or a list of layer summaries (dicts), got {layers!r:.80}")
    if not layers:
        raise ValueError("layers must hold at least one layer summary")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    entry = {"epoch": epoch}
    entry.update({k: v for k, v in layers[0].items() if k in ROUTING_FIELDS})
    entry["metrics"] = {}
    for name, value in (metrics or {}).items():
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            entry["metrics"][str(name)] = None if value is None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metrics[{name!r}] must be a number or None, got {value!r:.60}") from None
    if len(layers) > 1:
        entry["layers"] = [dict(layer) for layer in layers]
    return entry


# ---------------------------------------------------------------------------------------------- reading
def read_log(path: PathLike) -> TrainingLog:
    """Parse a JSON-lines training log strictly: UTF-8 (a leading BOM is skipped), lines end with ``\\n`` or
    ``\\r\\n``, blank lines are skipped.

    Raises:
        TypeError: ``path`` is not a path.
        LogFormatError: the file is missing, empty, or a line is not valid UTF-8 or JSON, lacks a required
            field, has a value of the wrong type or range, a utilization of another length than the first
            line's, a non-increasing epoch or other layers than the first line's. The message names the line.
    """
    path = check_path(path, "path")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LogFormatError(path, None, f"cannot read the log: {err}") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    log = TrainingLog(path=str(path), epochs=[], layers={}, metrics={})
    first: Optional[dict] = None
    # Only "\n" ends a line: str.splitlines() would also split inside JSON strings at U+2028, \x1c, ...
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LogFormatError(path, number, f"not valid UTF-8 (byte {chunk[err.start]:#04x} at column "
                                               f"{err.start + 1})") from None
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise LogFormatError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # an int of > 4300 digits, nesting deeper than the stack
            raise LogFormatError(path, number, f"not valid JSON ({_short(err, 120)})") from None
        _check_entry(entry, path, number, first)
        if first is None:
            first = entry
        elif entry["epoch"] <= log.epochs[-1]:
            raise LogFormatError(path, number, f"epoch {entry['epoch']} does not increase "
                                               f"(previous line has epoch {log.epochs[-1]})")
        _append(log, entry)
    if first is None:
        raise LogFormatError(path, None, "the log is empty: expected one JSON object per line")
    return log


def _append(log: TrainingLog, entry: dict) -> None:
    index = len(log.epochs)
    log.epochs.append(entry["epoch"])
    layers = entry.get("layers") or [dict(entry, layer="model")]
    for layer in layers:
        series = log.layers.setdefault(layer["layer"], LayerSeries(name=layer["layer"]))
        series.routing_acc.append(layer["routing_acc"])
        series.entropy.append(layer["entropy"])
        series.utilization.append(list(layer["utilization"]))
        series.dropped.append(layer.get("dropped"))
        series.hole = bool(layer.get("hole", False))
        series.null_columns = list(layer.get("null_columns") or [])
        if layer.get("affinity") is not None:
            series.affinity, series.affinity_epoch = layer["affinity"], entry["epoch"]
    for name, value in (entry.get("metrics") or {}).items():
        log.metrics.setdefault(name, [None] * index).append(value)
    for values in log.metrics.values():
        values.extend([None] * (index + 1 - len(values)))


def _is_number(v) -> bool:
    """A finite JSON number within ±MAX_ABS; ints are compared exactly (10**400 must not reach float())."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return -MAX_ABS <= v <= MAX_ABS  # False for NaN and ±Infinity too


def _is_text(v) -> bool:
    """A str that is valid Unicode: JSON escapes can smuggle in lone surrogates (\\ud800) that no font,
    file name or terminal accepts."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(v, width: int = 60) -> str:
    """``repr(v)`` cut to ``width`` characters: an error message stays one readable line."""
    text = repr(v) if not isinstance(v, BaseException) else str(v)
    return text if len(text) <= width else text[:width - 4] + " ..."


def _check_entry(entry, path, line: int, first: Optional[dict]) -> None:
    def fail(msg: str):
        raise LogFormatError(path, line, msg)

    if not isinstance(entry, dict):
        fail(f"expected a JSON object, got {type(entry).__name__}")
    if "epoch" not in entry:
        fail("missing field 'epoch'")
    epoch = entry["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        fail(f"'epoch' must be an int in [0, 2**53], got {_short(epoch)}")
    want_columns = len(first["utilization"]) if first else None
    _check_routing(entry, fail, "", want_columns)
    metrics = entry.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        fail(f"'metrics' must be an object of name: number, got {type(metrics).__name__}")
    for name, value in (metrics or {}).items():
        if not _is_text(name):
            fail(f"metric name {_short(name)} is not valid Unicode text")
        if value is not None and not _is_number(value):
            fail(f"metric {_short(name)} must be a number (finite, |v| <= 1e300) or null, got {_short(value)}")
    layers = entry.get("layers")
    if layers is None:
        if first is not None and first.get("layers") is not None:
            fail("missing field 'layers' (the first line has per-layer fields)")
        return
    if not isinstance(layers, list) or not layers or not all(isinstance(l, dict) for l in layers):
        fail("'layers' must be a non-empty list of objects")
    names = []
    for i, layer in enumerate(layers):
        name = layer.get("layer")
        if not _is_text(name) or not name:
            fail(f"layers[{i}] needs a non-empty string field 'layer' (valid Unicode), got {_short(name)}")
        want = None
        if first is not None and first.get("layers"):
            match = [l for l in first["layers"] if l["layer"] == name]
            want = len(match[0]["utilization"]) if match else None
        _check_routing(layer, fail, f"layers[{i}] ({_short(name)}): ", want)
        names.append(name)
    if len(set(names)) != len(names):
        fail(f"'layers' repeats a layer name: {_short(names)}")
    if first is not None:
        first_names = [l["layer"] for l in first.get("layers") or []]
        if names != first_names:
            fail(f"'layers' names {_short(names)} differ from the first line's {_short(first_names)}")


def _check_routing(obj: dict, fail, where: str, want_columns: Optional[int]) -> None:
    for name in REQUIRED[1:]:
        if name not in obj:
            fail(f"{where}missing field {name!r}")
    acc, entropy, util = obj["routing_acc"], obj["entropy"], obj["utilization"]
    if acc is not None and not (_is_number(acc) and 0 <= acc <= 1):
        fail(f"{where}'routing_acc' must be a number in [0, 1] or null, got {_short(acc)}")
    if not (_is_number(entropy) and entropy >= 0):
        fail(f"{where}'entropy' must be a number in [0, 1e300], got {_short(entropy)}")
    if not isinstance(util, list) or not util or not all(_is_number(u) and u >= 0 for u in util):
        fail(f"{where}'utilization' must be a non-empty list of numbers in [0, 1e300], got {_short(util)}")
    if want_columns is not None and len(util) != want_columns:
        fail(f"{where}'utilization' has {len(util)} values but the first line has {want_columns} "
             f"(one per router column)")
    if not isinstance(obj.get("hole", False), bool):
        fail(f"{where}'hole' must be true or false, got {_short(obj['hole'])}")
    null = obj.get("null_columns", [])
    if not (isinstance(null, list) and all(isinstance(k, str) and k in NULL_KINDS for k in null)
            and len(null) + int(obj.get("hole", False)) < len(util)):
        fail(f"{where}'null_columns' must be a list of kinds in {list(NULL_KINDS)} that leaves at least one "
             f"expert column in 'utilization', got {_short(null)}")
    dropped = obj.get("dropped")
    if dropped is not None and not (_is_number(dropped) and 0 <= dropped <= 1):
        fail(f"{where}'dropped' must be a fraction in [0, 1] or null, got {_short(dropped)}")
    aff = obj.get("affinity")
    if aff is not None:
        ok = (isinstance(aff, list) and aff and all(isinstance(r, list) for r in aff)
              and all(len(r) == len(util) and all(_is_number(v) and v >= 0 for v in r) for r in aff))
        if not ok:
            fail(f"{where}'affinity' must be a list of rows (one per class) of {len(util)} numbers in [0, 1e300] "
                 f"(one per router column)")
