"""The ``moefy`` command.

    moefy plot LOG --out DIR [--dpi 120] [--max-log-mb 16] [--max-metrics 16] [--max-layers 16]
                             [--max-columns 256] [--max-affinity-rows 512] [--max-dpi 600] [--max-megapixels 16]

turns a JSON-lines training log (see :mod:`moefy.observe.log`) into PNG dashboards and the affinity CSV;
``health.png`` (MaxVio, dead experts, load entropy over epochs; co-activation and top-1 transition heatmaps of
the last epoch that logged them) when the log has routing-health fields.
Exit status: 0 on success, 1 for a bad log, a log beyond a limit or an unwritable output folder, 2 for bad
arguments; every error is one line on stderr naming the file (and line, or the limit and the flag that raises
it), no traceback. A torn last line (a run killed mid-write) is skipped with a warning.

What it reads and writes: LOG must be a regular file (a symlink to one is followed; a FIFO, a device such as
``/dev/zero`` or a folder is refused), read line by line up to ``--max-log-mb``. Every output is written to a
new temporary file in DIR (created with O_EXCL, so nothing planted there is opened) and renamed over its name: a
symlink planted at an output path is replaced, never followed. DIR itself is the folder the user named (a
symlink to a folder is followed).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

MB = 1 << 20
MAX_SIDE = 65535  # Agg's limit on either side of an image, in pixels


@dataclass(frozen=True)
class PlotLimits:
    """What ``moefy plot`` agrees to draw; each field is the ``--max-...`` flag of the same name.

    Attributes:
        max_log_mb: size of LOG in MiB.
        max_metrics, max_layers, max_columns, max_affinity_rows: as :class:`moefy.observe.log.LogLimits`.
        max_dpi: the largest ``--dpi``.
        max_megapixels: pixels of any one PNG (the dashboard is the largest), in millions.
    """

    max_log_mb: float = 16
    max_metrics: int = 16
    max_layers: int = 16
    max_columns: int = 256
    max_affinity_rows: int = 512
    max_dpi: int = 600
    max_megapixels: float = 16


DEFAULTS = PlotLimits()


class PlotLimitError(ValueError):
    """A figure beyond ``--max-megapixels`` (or Agg's 65535 pixels a side); the message names the flag."""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefy", description="moefy: see what the router of a mixture does.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plot = commands.add_parser(
        "plot", help="plot a JSON-lines training log",
        description="Plot a JSON-lines training log: expert utilization over epochs, router entropy, routing "
                    "accuracy, the class x expert affinity heatmap (+ CSV), the metric curves and a dashboard "
                    "with all of them; health.png: MaxVio, dead experts and load entropy over epochs, the "
                    "co-activation and layer-to-layer transition heatmaps. A bad log stops with an error naming the line; a log beyond a limit "
                    "with an error naming the flag that raises it.")
    plot.add_argument("log", metavar="LOG", help="training log, one JSON object per line (a regular file)")
    plot.add_argument("--out", metavar="DIR", required=True, help="output folder (created if missing)")
    plot.add_argument("--dpi", type=_positive(int), default=120, help="resolution of the PNGs (default: 120)")
    limits = plot.add_argument_group("limits", "what moefy plot agrees to read and draw")
    for name, kind, help_text in (
            ("max_log_mb", float, "the largest LOG read, in MiB"), ("max_metrics", int, "the most metric names"),
            ("max_layers", int, "the most MoE layers"), ("max_columns", int, "the most router columns of a layer"),
            ("max_affinity_rows", int, "the most rows (classes) of an affinity matrix"),
            ("max_dpi", int, "the largest --dpi"), ("max_megapixels", float, "the largest PNG, in megapixels")):
        limits.add_argument(f"--{name.replace('_', '-')}", type=_positive(kind), default=getattr(DEFAULTS, name),
                            metavar="N", help=f"{help_text} (default: {getattr(DEFAULTS, name):g})")
    return parser


def _flag(limit: str) -> str:
    return f"--{limit.replace('_', '-')}"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("moefy")
    except Exception:  # not installed: running from a checkout
        return "(source checkout)"


def plot_log(log_path: str, out: str, dpi: int = 120, limits: PlotLimits = DEFAULTS) -> List[Path]:
    """Write the dashboards of ``log_path`` into ``out``; returns the files written.

    Every figure is built and its size checked before anything is written; each file is written to a new
    temporary name in ``out`` and renamed into place (a symlink at its name is replaced, not followed).

    Raises:
        moefy.observe.log.LogFormatError: the log is malformed (names the line), or beyond ``limits``
            (a LogLimitError, whose ``limit`` names the field).
        PlotLimitError: a figure would have more than ``limits.max_megapixels`` at ``dpi``.
        OSError: ``out`` cannot be written.
    """
    from .log import LogLimits, read_log
    from ..viz import dashboard

    log = read_log(log_path, LogLimits(
        max_bytes=max(1, int(limits.max_log_mb * MB)), max_metrics=limits.max_metrics, max_layers=limits.max_layers,
        max_columns=limits.max_columns, max_affinity_rows=limits.max_affinity_rows))
    figures = [("utilization.png", dashboard.plot_utilization(log)), ("entropy.png", dashboard.plot_entropy(log))]
    skipped = []
    for name, make in (("routing_accuracy.png", dashboard.plot_routing_accuracy),
                       ("affinity.png", dashboard.plot_affinity), ("metrics.png", dashboard.plot_metrics),
                       ("health.png", dashboard.plot_health)):
        try:
            figures.append((name, make(log)))
        except ValueError as err:  # optional content missing from the log
            skipped.append(f"moefy plot: skipped {name}: {err}")
    figures.append(("dashboard.png", dashboard.plot_dashboard(log)))
    for name, fig in figures:
        _check_pixels(name, fig, dpi, limits.max_megapixels)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def save_next() -> None:  # a drawn figure keeps its pixel buffer: let each go once written
        name, fig = figures.pop(0)
        written.append(_write_new(out_dir, name, lambda f: fig.savefig(f, format="png", dpi=dpi)))

    while len(figures) > 1:
        save_next()
    with_aff = [s for s in log.layers.values() if s.affinity is not None]
    for series in with_aff:
        name = "affinity.csv" if len(with_aff) == 1 else f"affinity_{dashboard.safe_name(series.name)}.csv"
        if out_dir / name in written:  # two layer names that differ only in characters safe_name replaced
            name = f"{name[:-4]}_{len(written)}.csv"
        text = dashboard.affinity_csv(series).encode("utf-8")
        written.append(_write_new(out_dir, name, lambda f: f.write(text)))
    save_next()  # the dashboard
    for note in skipped:  # only once everything is written: an error stays the one line on stderr
        print(note, file=sys.stderr)
    return written


def _check_pixels(name: str, fig, dpi: int, max_megapixels: float) -> None:
    width, height = (round(v * dpi) for v in fig.get_size_inches())
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise PlotLimitError(f"{name} would be {width:,} x {height:,} pixels ({megapixels:,.1f} megapixels) at "
                             f"--dpi {dpi}, above the limit max_megapixels={max_megapixels:g} (--max-megapixels "
                             f"raises it, a lower --dpi shrinks the image)")
    if max(width, height) > MAX_SIDE:
        raise PlotLimitError(f"{name} would be {width:,} x {height:,} pixels at --dpi {dpi}, more than matplotlib "
                             f"draws ({MAX_SIDE:,} a side): lower --dpi")


def _write_new(out_dir: Path, name: str, write: Callable) -> Path:
    """Write ``out_dir / name`` through a file this call creates (O_EXCL | O_NOFOLLOW: nothing planted under
    the temporary name is opened), renamed over ``name`` (a symlink there is replaced, not followed)."""
    final = out_dir / name
    temp = out_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return final


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"moefy plot: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show moefy's logged warnings (a torn last line) as ``moefy plot: warning: ...`` lines, unless the
    caller configured logging."""
    if logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("moefy")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``moefy`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not 10 <= args.dpi <= args.max_dpi:
        print(f"moefy plot: error: --dpi must be in [10, {args.max_dpi}] (the limit max_dpi={args.max_dpi}; "
              f"--max-dpi raises it), got {args.dpi}", file=sys.stderr)
        return 2
    limits = PlotLimits(**{name: getattr(args, name) for name in PlotLimits.__dataclass_fields__})
    from .log import LogFormatError, LogLimitError
    try:
        with _warnings_to_stderr():
            written = plot_log(args.log, args.out, args.dpi, limits)
    except LogLimitError as err:
        if err.limit == "max_bytes":
            print(f"moefy plot: error: {err} = {args.max_log_mb:g} MiB (--max-log-mb raises it)", file=sys.stderr)
        else:
            print(f"moefy plot: error: {err} ({_flag(err.limit)} raises it)", file=sys.stderr)
        return 1
    except LogFormatError as err:
        print(f"moefy plot: error: {err}", file=sys.stderr)
        return 1
    except PlotLimitError as err:
        print(f"moefy plot: error: {args.log}: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"moefy plot: error: cannot write to {args.out}: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
