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

Routing health (optional, per layer; :mod:`moefy.observe.health` defines them over the real experts, the null
columns and the hole left out): ``max_vio`` (MaxVio of the epoch's summed load), ``max_vio_batch`` (the mean of
each recorded batch's MaxVio), ``cv`` (the load's coefficient of variation), ``load_entropy`` (nats, entropy of
the load distribution over the experts; ``entropy`` is the mean per-token router entropy), each a number ≥ 0 or
null; ``dead`` (ids of the experts without a token, increasing, in [0, E)); ``coactivation`` (E rows of E
counts: tokens processed by both experts; the diagonal: by the expert); ``transition_to`` (the name of another
layer of the line) with ``transition`` (one row per router column of this layer, one count per router column of
``transition_to``: tokens whose top-1 column went from the row to the column). ``transition`` is a field of a
``layers`` entry only. A log without them (older logs) reads as before.

Numbers are finite (no NaN / Infinity) and within ±1e300, epochs ≤ 2**53; names are valid Unicode. The file is
UTF-8 (a BOM is skipped) with ``\\n`` or ``\\r\\n`` line ends. The parser rejects the whole file on the first bad
line with a :class:`LogFormatError` naming the line.

Crashes. The writer writes each line with one ``write`` of the whole line and its ``\\n``; a process killed in
the middle of it leaves a *torn* last line: one without a ``\\n`` that is not valid JSON. The reader skips a
torn last line with a logged warning and keeps every complete line before it; a torn line anywhere else is an
error like any other. ``TrainingLogWriter(path, mode="a")`` truncates a torn tail before appending (the next
line never glues onto it), and continues the log: it reads the existing lines on open, refuses a file its
reader refuses, and then refuses any line the reader would refuse after them (an epoch that does not
increase, another number of router columns, other layers, ...). :attr:`TrainingLogWriter.last_epoch` says
where a restarted run resumes.

Untrusted logs. :func:`read_log` opens regular files only (``/dev/zero``, a FIFO or a folder is a
LogFormatError), reads line by line, and with :class:`LogLimits` refuses, before keeping a line, a file over
``max_bytes`` or a line with more metrics, layers, router columns or affinity rows than allowed
(:class:`LogLimitError`, naming the limit); a line over 1 MiB whose count of ``[``, ``{`` or ``,`` exceeds
what such a line can hold is refused before ``json`` builds it.
"""
from __future__ import annotations

import codecs
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, List, Mapping, Optional, Sequence, Union

from ..checks import check_path

REQUIRED = ("epoch", "routing_acc", "entropy", "utilization")
HEALTH_NUMBERS = ("max_vio", "max_vio_batch", "cv", "load_entropy")  # numbers >= 0 or null
HEALTH_FIELDS = HEALTH_NUMBERS + ("dead", "coactivation")
MAX_EPOCH = 2 ** 53  # epochs stay exact as floats (plot axes)
MAX_ABS = 1e300  # larger magnitudes overflow the arithmetic of plot axis limits
ROUTING_FIELDS = ("routing_acc", "entropy", "utilization", "hole", "null_columns", "dropped", "affinity") \
    + HEALTH_FIELDS  # copied from the first layer to the top level (co-activation only in a one-layer log)
NULL_KINDS = ("copy", "constant", "zero")  # as moefy.config.NULL_KINDS (this module reads logs without torch)
PathLike = Union[str, Path]
logger = logging.getLogger(__name__)


class LogFormatError(ValueError):
    """A training log that does not follow the format; ``str(err)`` is ``"PATH:LINE: what is wrong"``."""

    def __init__(self, path, line: Optional[int], message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


class LogLimitError(LogFormatError):
    """A log beyond one of the :class:`LogLimits` given to :func:`read_log`; ``limit`` names the field."""

    def __init__(self, path, line: Optional[int], message: str, limit: str):
        self.limit = limit
        super().__init__(path, line, message)


@dataclass(frozen=True)
class LogLimits:
    """Bounds :func:`read_log` enforces as it reads, line by line, before a line is kept (None: unbounded), so
    that a hostile log costs at most about ``max_bytes`` of memory and what is kept stays drawable.

    Attributes:
        max_bytes: size of the file.
        max_metrics: distinct metric names over all lines.
        max_layers: entries of ``layers``.
        max_columns: router columns (the length of ``utilization``) of any layer; it also bounds ``dead`` and
            the ``coactivation`` and ``transition`` matrices (at most ``max_columns`` x ``max_columns``).
        max_affinity_rows: rows (classes) of any ``affinity`` matrix.
    """

    max_bytes: Optional[int] = None
    max_metrics: Optional[int] = None
    max_layers: Optional[int] = None
    max_columns: Optional[int] = None
    max_affinity_rows: Optional[int] = None

    def __post_init__(self):
        for name, value in vars(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LogLimits.{name} must be a positive int or None, got {value!r:.60}")

    def check(self, limit: str, path, line: Optional[int], what: str, value: int) -> None:
        """LogLimitError ``"PATH:LINE: {what} {value}, above the limit {limit}=N"`` if ``value`` > the limit."""
        bound = getattr(self, limit)
        if bound is not None and value > bound:
            raise LogLimitError(path, line, f"{what} {value:,}, above the limit {limit}={bound:,}", limit)


@dataclass
class LayerSeries:
    """One layer's routing fields over the epochs (aligned with :attr:`TrainingLog.epochs`).

    ``utilization`` is (epochs, E'); ``affinity`` is the last matrix logged, from epoch ``affinity_epoch``.
    The health series (``max_vio``, ``max_vio_batch``, ``cv``, ``load_entropy``, ``dead``) hold None for an
    epoch that did not log them; ``coactivation`` (E, E) and ``transition`` (E', E'_next, to the layer
    ``transition_to``) are the last matrices logged, from epochs ``coactivation_epoch`` / ``transition_epoch``.
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
    max_vio: List[Optional[float]] = field(default_factory=list)
    max_vio_batch: List[Optional[float]] = field(default_factory=list)
    cv: List[Optional[float]] = field(default_factory=list)
    load_entropy: List[Optional[float]] = field(default_factory=list)
    dead: List[Optional[List[int]]] = field(default_factory=list)
    coactivation: Optional[List[List[float]]] = None
    coactivation_epoch: Optional[int] = None
    transition: Optional[List[List[float]]] = None
    transition_to: Optional[str] = None
    transition_epoch: Optional[int] = None

    @property
    def num_columns(self) -> int:
        return len(self.utilization[0])

    @property
    def num_experts(self) -> int:
        """E: the router columns less the null columns and the hole."""
        return self.num_columns - len(self.null_columns) - int(self.hole)

    @property
    def has_health(self) -> bool:
        """Whether any epoch logged a health field."""
        return any(v is not None for series in (self.max_vio, self.max_vio_batch, self.cv, self.load_entropy,
                                                self.dead) for v in series)


@dataclass
class TrainingLog:
    """A parsed log. ``layers`` holds every MoE layer of a multi-layer log; for a one-layer (seed) log it
    holds the top-level fields as one layer named ``"model"``. ``metrics[name]`` is aligned with
    ``epochs`` (None where a line lacks it)."""

    path: str
    epochs: List[int]
    layers: Dict[str, LayerSeries]
    metrics: Dict[str, List[Optional[float]]]
    torn_line: Optional[int] = None  # the number of a torn last line that was skipped (a write cut short)


# ---------------------------------------------------------------------------------------------- writing
class TrainingLogWriter:
    """Appends one validated JSON line per :meth:`write`, with a single ``write`` of the whole line (a crash
    loses nothing written before, and leaves at most a torn last line, which the reader skips).

    Every line is checked as :func:`read_log` checks it, against the lines already in the log: the epoch must
    increase, and the router columns (count, ``hole``, ``null_columns``) and the layers must be those of the
    first line. A refused line raises :class:`LogFormatError` (a ValueError naming the field) and writes nothing.

    Args:
        path: the log file; created with its parent folder.
        mode: ``"w"`` to start a new log (an existing file is emptied), ``"a"`` to continue one: the existing
            lines are read on open (a file :func:`read_log` refuses is refused, LogFormatError), a torn last
            line is cut off (with a logged warning), and the next epoch must follow :attr:`last_epoch`.

    Attributes:
        last_epoch: the epoch of the last line in the log (None while it has none): a restarted run resumes
            at ``last_epoch + 1``.
    """

    def __init__(self, path: PathLike, mode: str = "w"):
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        self.path = check_path(path, "path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_epoch: Optional[int] = None
        self._first: Optional[dict] = None
        self._lines = 0
        existing = self._read_existing() if mode == "a" else None
        # O_APPEND in both modes: after a failed write is cut back (_write_all), the next one starts at the end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
                           | (0 if mode == "a" else os.O_TRUNC), 0o666)
        if existing is not None:
            self._resume(existing)

    def _read_existing(self) -> Optional["_Parsed"]:
        if not os.path.lexists(self.path):
            return None
        try:
            with _open_regular(self.path) as file:
                return _parse(file, self.path, LogLimits())
        except LogFormatError as err:
            raise LogFormatError(err.path, err.line, f"{err.message} (mode='a' appends only to a log that "
                                                     f"read_log accepts)") from None

    def _resume(self, existing: "_Parsed") -> None:
        self._first, self._lines = existing.first, existing.lines
        self.last_epoch = existing.log.epochs[-1] if existing.log.epochs else None
        if existing.log.torn_line is not None:
            os.ftruncate(self._fd, existing.end)
            logger.warning("%s:%d: cut off the torn last line (%d bytes without a newline, a write cut short) "
                           "before appending", self.path, existing.log.torn_line, existing.size - existing.end)
        elif existing.size and not existing.ends_with_newline:  # a complete last line without its "\n"
            self._write_all(b"\n")

    def write(self, epoch: int, layers, metrics: Optional[Dict[str, float]] = None, matrices: bool = True) -> dict:
        """Write the line of ``epoch``.

        Args:
            epoch: epoch number (strictly increasing, also across a restart with ``mode="a"``).
            layers: a :class:`moefy.observe.recorder.RoutingRecorder` or its ``summary()`` (one dict per layer).
            metrics: name → number (accuracy, loss, ...).
            matrices: with a recorder, also write the co-activation and transition matrices (E² + E'·E'_next
                numbers per layer; ``moefy plot`` draws the last ones): False keeps a long log small.
        Returns:
            the object written.
        Raises:
            LogFormatError: the line is one :func:`read_log` would refuse after the lines already logged
                (names the field); nothing is written.
        """
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed")
        summary = layers.summary(matrices=matrices) if hasattr(layers, "summary") else layers
        entry = log_entry(epoch, summary, metrics)
        line = self._lines + 1
        _check_entry(entry, self.path, line, self._first)
        _check_epoch_increases(entry, self.path, line, self.last_epoch,
                               f"; a restarted run continues at writer.last_epoch + 1 = {(self.last_epoch or 0) + 1}")
        text = json.dumps(entry)
        self._write_all((text + "\n").encode("utf-8"))
        self._lines, self.last_epoch = line, entry["epoch"]
        if self._first is None:
            self._first = json.loads(text)  # as the reader sees it, and no list the caller may still change
        return entry

    def _write_all(self, data: bytes) -> None:
        """Write ``data`` at the end; on an error (a full disk) cut the file back to where it was, so that no
        half line stays for the next one to glue onto."""
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "TrainingLogWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
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
    entry.update({k: v for k, v in layers[0].items()
                  if k in ROUTING_FIELDS and (k != "coactivation" or len(layers) == 1)})
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
def read_log(path: PathLike, limits: Optional[LogLimits] = None) -> TrainingLog:
    """Parse a JSON-lines training log strictly: UTF-8 (a leading BOM is skipped), lines end with ``\\n`` or
    ``\\r\\n``, blank lines are skipped. A torn last line (no ``\\n`` at its end and not valid JSON: a write
    cut short by a crash) is skipped with a logged warning; :attr:`TrainingLog.torn_line` names it.

    Args:
        path: a regular file (a symlink to one is followed; a FIFO, device or folder is refused).
        limits: bounds on the file's size, the number of metrics, layers, router columns and affinity rows
            (:class:`LogLimits`; None: none). The file is read line by line, never more than ``max_bytes``.

    Raises:
        TypeError: ``path`` is not a path.
        LogLimitError: the log is beyond one of ``limits`` (``err.limit`` names it).
        LogFormatError: the file is missing, not a regular file, empty, or a line is not valid UTF-8 or JSON,
            lacks a required field, has a value of the wrong type or range, a utilization of another length
            than the first line's, a non-increasing epoch or other layers than the first line's. The message
            names the line.
    """
    path = check_path(path, "path")
    if limits is None:
        limits = LogLimits()
    elif not isinstance(limits, LogLimits):
        raise TypeError(f"limits must be a LogLimits or None, got {type(limits).__name__}")
    with _open_regular(path) as file:
        limits.check("max_bytes", path, None, "the log's size in bytes is", os.fstat(file.fileno()).st_size)
        parsed = _parse(file, path, limits)
    log = parsed.log
    if log.torn_line is not None:
        if not log.epochs:
            raise LogFormatError(path, log.torn_line, f"{parsed.torn_reason}, and there is no complete line before "
                                                      f"it (a torn last line: a write cut short)")
        logger.warning("%s:%d: skipped the torn last line (%d bytes without a newline, %s: a write cut short); "
                       "kept the %d epochs before it", path, log.torn_line, parsed.size - parsed.end,
                       parsed.torn_reason, len(log.epochs))
    elif not log.epochs:
        raise LogFormatError(path, None, "the log is empty: expected one JSON object per line")
    return log


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (after symlinks); a LogFormatError for
    anything else: ``/dev/zero`` never ends, a FIFO blocks (hence O_NONBLOCK, harmless on a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise LogFormatError(path, None, f"cannot read the log: {err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
        raise LogFormatError(path, None, f"cannot read the log: not a regular file ({kind})")
    return os.fdopen(fd, "rb")


@dataclass
class _Parsed:
    """What :func:`_parse` found: the log, its first entry, the number of lines before a torn tail, the byte
    offset where that tail starts (``end``), the bytes read (``size``), whether they end with ``\n`` and, for a
    torn tail, why it does not parse (``torn_reason``)."""

    log: TrainingLog
    first: Optional[dict]
    lines: int
    end: int
    size: int
    ends_with_newline: bool
    torn_reason: str = ""


def _parse(file: BinaryIO, path: Path, limits: LogLimits) -> _Parsed:
    log = TrainingLog(path=str(path), epochs=[], layers={}, metrics={})
    first: Optional[dict] = None
    number = offset = end = 0
    last_chunk = b""
    while True:
        # Only "\n" ends a line: str.splitlines() would also split inside JSON strings at U+2028, \x1c, ...
        chunk = file.readline(-1 if limits.max_bytes is None else limits.max_bytes + 1 - offset)
        if not chunk:
            break
        offset += len(chunk)
        last_chunk = chunk
        limits.check("max_bytes", path, None, "the log's size in bytes is at least", offset)  # it grew
        number += 1
        if number == 1 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
        torn = not chunk.endswith(b"\n")  # only the last line can lack its "\n"
        _check_line_structure(chunk, path, number, limits)
        try:
            entry = _parse_line(chunk, path, number, torn)
        except _TornLine as err:
            log.torn_line = number
            return _Parsed(log, first, number - 1, end, offset, False, str(err))
        end = offset
        if entry is None:
            continue
        _check_entry(entry, path, number, first)
        _check_epoch_increases(entry, path, number, log.epochs[-1] if log.epochs else None)
        _check_limits(entry, path, number, log, limits)
        if first is None:
            first = entry
        _append(log, entry)
    return _Parsed(log, first, number, end, offset, last_chunk.endswith(b"\n") or not offset)


class _TornLine(Exception):
    """A last line without "\\n" that does not parse: the message says why."""


def _parse_line(chunk: bytes, path: Path, number: int, last_without_newline: bool) -> Optional[dict]:
    """The JSON value of one line (None for a blank one); _TornLine where a line without its ``\\n`` does not
    parse, LogFormatError for any other line that does not."""
    try:
        line = chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        if last_without_newline and err.end == len(chunk) and err.reason == "unexpected end of data":
            raise _TornLine("a UTF-8 character cut short") from None
        raise LogFormatError(path, number, f"not valid UTF-8 (byte {chunk[err.start]:#04x} at column "
                                           f"{err.start + 1})") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        if last_without_newline:
            raise _TornLine(f"not valid JSON ({err.msg} at column {err.colno})") from None
        raise LogFormatError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an int of > 4300 digits, nesting deeper than the stack
        raise LogFormatError(path, number, f"not valid JSON ({_short(err, 120)})") from None


def _check_epoch_increases(entry: dict, path, line: int, last_epoch: Optional[int], hint: str = "") -> None:
    if last_epoch is not None and entry["epoch"] <= last_epoch:
        raise LogFormatError(path, line, f"epoch {entry['epoch']} does not increase (previous line has epoch "
                                         f"{last_epoch}){hint}")


STRUCTURE_SLACK = 4096  # brackets / commas a line may hold beyond what the format's fields need (other fields)
STRUCTURE_MIN_BYTES = 1 << 20  # shorter lines parse in a few tens of MB at most: their fields' checks name them


def _check_line_structure(chunk: bytes, path: Path, line: int, limits: LogLimits) -> None:
    """Refuse, before ``json.loads`` builds it, a line with more lists, objects or elements than a line within
    ``limits`` can hold: parsing allocates up to ~20 bytes per byte of ``[0],[0],...``, so a file within
    ``max_bytes`` could still take gigabytes. Counting the bytes ``[``, ``{`` and ``,`` bounds those counts
    from above (the same bytes inside strings only make the count larger)."""
    bounds = limits.max_layers, limits.max_affinity_rows, limits.max_columns, limits.max_metrics
    if None in bounds or len(chunk) < STRUCTURE_MIN_BYTES:
        return
    layers, rows, columns, metrics = bounds
    objects = layers + 1  # the line's routing fields and each layer's
    # per object: utilization, null_columns, dead (columns each at most), affinity (rows x columns),
    # coactivation and transition (columns x columns each), and a few dozen keys
    lists = rows + 2 * columns + 6
    values = columns * (rows + 3) + 2 * columns * columns + 32
    for byte, most, what, limit in ((b"{", objects + 2, "objects", "max_layers"),
                                    (b"[", objects * lists + 1, "lists", "max_affinity_rows"),
                                    (b",", objects * values + metrics, "values", "max_columns")):
        found = chunk.count(byte)
        if found > most + STRUCTURE_SLACK:
            raise LogLimitError(path, line, f"the line holds {found:,} {what} (bytes {byte.decode()!r}), more than "
                                f"the {most + STRUCTURE_SLACK:,} a line within the limits can hold: above the "
                                f"limit {limit}={getattr(limits, limit):,}", limit)


def _check_limits(entry: dict, path: Path, line: int, log: TrainingLog, limits: LogLimits) -> None:
    metrics = entry.get("metrics") or {}
    limits.check("max_metrics", path, line, "the number of metric names is",
                 len(log.metrics) + sum(name not in log.metrics for name in metrics))
    layers = entry.get("layers")
    if layers is not None:
        limits.check("max_layers", path, line, "the number of layers ('layers') is", len(layers))
    for where, layer in ([("", entry)] if layers is None else
                         [(f"layers[{i}] ({_short(l['layer'])}): ", l) for i, l in enumerate(layers)]):
        limits.check("max_columns", path, line, f"{where}the number of router columns ('utilization') is",
                     len(layer["utilization"]))
        limits.check("max_affinity_rows", path, line, f"{where}the number of 'affinity' rows (classes) is",
                     len(layer.get("affinity") or ()))


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
        for name in HEALTH_NUMBERS + ("dead",):
            getattr(series, name).append(layer.get(name))
        if layer.get("coactivation") is not None:
            series.coactivation, series.coactivation_epoch = layer["coactivation"], entry["epoch"]
        if layer.get("transition") is not None:
            series.transition, series.transition_epoch = layer["transition"], entry["epoch"]
            series.transition_to = layer["transition_to"]
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
    _check_routing(entry, fail, "", first)
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
        if "transition" in entry or "transition_to" in entry:
            fail("'transition' / 'transition_to' need 'layers': they map a layer's columns to another layer's")
        return
    if not isinstance(layers, list) or not layers or not all(isinstance(l, dict) for l in layers):
        fail("'layers' must be a non-empty list of objects")
    names = []
    first_layers = {l["layer"]: l for l in (first or {}).get("layers") or []}
    for i, layer in enumerate(layers):
        name = layer.get("layer")
        if not _is_text(name) or not name:
            fail(f"layers[{i}] needs a non-empty string field 'layer' (valid Unicode), got {_short(name)}")
        _check_routing(layer, fail, f"layers[{i}] ({_short(name)}): ", first_layers.get(name))
        names.append(name)
    if len(set(names)) != len(names):
        fail(f"'layers' repeats a layer name: {_short(names)}")
    columns = {l["layer"]: len(l["utilization"]) for l in layers}
    for where, obj in [("", entry)] + [(f"layers[{i}] ({_short(l['layer'])}): ", l) for i, l in enumerate(layers)]:
        _check_transition(obj, fail, where, columns)
    if first is not None:
        first_names = [l["layer"] for l in first.get("layers") or []]
        if names != first_names:
            fail(f"'layers' names {_short(names)} differ from the first line's {_short(first_names)}")


def _check_routing(obj: dict, fail, where: str, like: Optional[dict]) -> None:
    """The routing fields of ``obj`` (a line, or a layer of it); ``like``: the same object on the first line,
    whose router columns (count, hole, null kinds) ``obj`` must have."""
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
    if like is not None and len(util) != len(like["utilization"]):
        fail(f"{where}'utilization' has {len(util)} values but the first line has {len(like['utilization'])} "
             f"(one per router column)")
    if not isinstance(obj.get("hole", False), bool):
        fail(f"{where}'hole' must be true or false, got {_short(obj['hole'])}")
    null = obj.get("null_columns", [])
    if not (isinstance(null, list) and all(isinstance(k, str) and k in NULL_KINDS for k in null)
            and len(null) + int(obj.get("hole", False)) < len(util)):
        fail(f"{where}'null_columns' must be a list of kinds in {list(NULL_KINDS)} that leaves at least one "
             f"expert column in 'utilization', got {_short(null)}")
    if like is not None:
        for name, value, first_value in (("hole", bool(obj.get("hole", False)), bool(like.get("hole", False))),
                                         ("null_columns", list(null), list(like.get("null_columns") or []))):
            if value != first_value:
                fail(f"{where}{name!r} is {_short(value)} but the first line has {_short(first_value)} "
                     f"(the router columns must not change)")
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
    _check_health(obj, fail, where, len(util) - len(null) - int(obj.get("hole", False)))


def _is_matrix(value, rows: int, columns: int) -> bool:
    """A list of ``rows`` lists of ``columns`` numbers in [0, MAX_ABS]."""
    return (isinstance(value, list) and len(value) == rows and all(
        isinstance(r, list) and len(r) == columns and all(_is_number(v) and v >= 0 for v in r) for r in value))


def _check_health(obj: dict, fail, where: str, experts: int) -> None:
    """The routing-health fields of ``obj`` (all optional); ``experts``: E, its real experts."""
    for name in HEALTH_NUMBERS:
        value = obj.get(name)
        if value is not None and not (_is_number(value) and value >= 0):
            fail(f"{where}{name!r} must be a number in [0, 1e300] or null, got {_short(value)}")
    dead = obj.get("dead")
    if dead is not None and not (isinstance(dead, list) and all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e < experts for e in dead)
            and all(a < b for a, b in zip(dead, dead[1:]))):
        fail(f"{where}'dead' must be an increasing list of expert ids in [0, {experts}) (the real experts), "
             f"got {_short(dead)}")
    coact = obj.get("coactivation")
    if coact is not None and not _is_matrix(coact, experts, experts):
        fail(f"{where}'coactivation' must be {experts} rows of {experts} numbers in [0, 1e300] (real experts x "
             f"real experts)")


def _check_transition(obj: dict, fail, where: str, columns: Dict[str, int]) -> None:
    """``transition_to`` names a layer of the line (``columns``: name → its router columns) and ``transition``
    is (this layer's columns) x (that layer's columns)."""
    if "transition" not in obj and "transition_to" not in obj:
        return
    target, matrix = obj.get("transition_to"), obj.get("transition")
    if not (_is_text(target) and target in columns):
        fail(f"{where}'transition_to' must name a layer of 'layers', got {_short(target)}")
    rows, cols = len(obj["utilization"]), columns[target]
    if not _is_matrix(matrix, rows, cols):
        fail(f"{where}'transition' must be {rows} rows (this layer's router columns) of {cols} numbers in "
             f"[0, 1e300] (the router columns of {_short(target)})")
