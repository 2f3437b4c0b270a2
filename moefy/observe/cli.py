"""The ``moefy`` command.

    moefy plot LOG --out DIR [--dpi 120]

turns a JSON-lines training log (see :mod:`moefy.observe.log`) into PNG dashboards and the affinity CSV.
Exit status: 0 on success, 1 for a bad log or an unwritable output folder (one line on stderr naming the
file and line, no traceback), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefy", description="moefy: see what the router of a mixture does.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plot = commands.add_parser(
        "plot", help="plot a JSON-lines training log",
        description="Plot a JSON-lines training log: expert utilization over epochs, router entropy, routing "
                    "accuracy, the class x expert affinity heatmap (+ CSV), the metric curves and a dashboard "
                    "with all of them. A bad log stops with an error naming the line.")
    plot.add_argument("log", metavar="LOG", help="training log, one JSON object per line")
    plot.add_argument("--out", metavar="DIR", required=True, help="output folder (created if missing)")
    plot.add_argument("--dpi", type=int, default=120, help="resolution of the PNGs (default: 120)")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("moefy")
    except Exception:  # not installed: running from a checkout
        return "(source checkout)"


def plot_log(log_path: str, out: str, dpi: int = 120) -> List[Path]:
    """Write the dashboards of ``log_path`` into ``out``; returns the files written.

    Raises:
        moefy.observe.log.LogFormatError: the log is malformed (names the line).
        OSError: ``out`` cannot be written.
    """
    from .log import read_log
    from ..viz import dashboard

    log = read_log(log_path)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []

    def save(fig, name: str) -> None:
        fig.savefig(out_dir / name, dpi=dpi)
        written.append(out_dir / name)

    save(dashboard.plot_utilization(log), "utilization.png")
    save(dashboard.plot_entropy(log), "entropy.png")
    for name, make in (("routing_accuracy.png", dashboard.plot_routing_accuracy),
                       ("affinity.png", dashboard.plot_affinity), ("metrics.png", dashboard.plot_metrics)):
        try:
            save(make(log), name)
        except ValueError as err:  # optional content missing from the log
            print(f"moefy plot: skipped {name}: {err}", file=sys.stderr)
    with_aff = [s for s in log.layers.values() if s.affinity is not None]
    for series in with_aff:
        name = "affinity.csv" if len(with_aff) == 1 else f"affinity_{dashboard.safe_name(series.name)}.csv"
        if out_dir / name in written:  # two layer names that differ only in characters safe_name replaced
            name = f"{name[:-4]}_{len(written)}.csv"
        (out_dir / name).write_text(dashboard.affinity_csv(series), encoding="utf-8")
        written.append(out_dir / name)
    save(dashboard.plot_dashboard(log), "dashboard.png")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``moefy`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.dpi < 10:
        parser.error(f"--dpi must be >= 10, got {args.dpi}")
    from .log import LogFormatError
    try:
        written = plot_log(args.log, args.out, args.dpi)
    except LogFormatError as err:
        print(f"moefy plot: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"moefy plot: error: cannot write to {args.out}: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
