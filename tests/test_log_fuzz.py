"""Fuzz of the JSON-lines training-log parser (:func:`moefy.observe.log.read_log`) and of ``moefy plot``.

Whatever the bytes, ``read_log`` either returns a log whose records are valid (increasing int epochs, one
utilization row of the same width per epoch, finite numbers) or raises ``LogFormatError`` naming the file
and the line, in one short line; ``moefy plot`` then exits 1 with exactly one stderr line and no
traceback. Hypothesis runs 200 examples (``MOEFY_FUZZ_EXAMPLES=5000`` for a longer run by hand).
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefy.observe.cli import main
from moefy.observe.log import LogFormatError, read_log
from moefy.viz.dashboard import safe_name

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("MOEFY_FUZZ_EXAMPLES", "200"))
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # CJK / emoji names: DejaVu lacks them


def good(epoch=1, columns=2, **extra):
    return {"epoch": epoch, "routing_acc": 0.5, "entropy": 0.69, "utilization": [1 / columns] * columns, **extra}


def lines(*entries, end="\n"):
    return "".join((e if isinstance(e, str) else json.dumps(e)) + end for e in entries).encode("utf-8")


def check_outcome(path: Path, text: bytes):
    """read_log(path): a valid log (returned) or a LogFormatError naming a line of the file (returns None)."""
    try:
        log = read_log(path)
    except LogFormatError as err:
        last = text.count(b"\n") + 1
        assert err.line is None or 1 <= err.line <= last, (err.line, last)
        assert str(err).startswith(f"{path}:{err.line}: " if err.line else f"{path}: ")
        assert "\n" not in str(err) and len(str(err)) < 400, str(err)[:400]
        return None
    assert log.epochs and all(type(e) is int and 0 <= e <= 2 ** 53 for e in log.epochs)
    assert all(a < b for a, b in zip(log.epochs, log.epochs[1:]))
    for series in log.layers.values():
        assert len(series.utilization) == len(series.entropy) == len(series.routing_acc) == len(log.epochs)
        assert len({len(row) for row in series.utilization}) == 1
        numbers = [*series.entropy, *(v for row in series.utilization for v in row),
                   *(v for v in series.routing_acc + series.dropped if v is not None),
                   *(v for row in series.affinity or [] for v in row)]
        assert all(type(v) in (int, float) and math.isfinite(v) and abs(v) <= 1e300 for v in numbers)
    for values in log.metrics.values():
        assert len(values) == len(log.epochs)
        assert all(v is None or (type(v) in (int, float) and math.isfinite(v)) for v in values)
    return log


def run_cli(path: Path, out: Path):
    """``moefy plot`` in-process: (exit status, stdout, stderr); an exception escaping main fails the test."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["plot", str(path), "--out", str(out), "--dpi", "20"])
    return code, stdout.getvalue(), stderr.getvalue()


def assert_cli_rejects(path: Path, out: Path):
    code, stdout, stderr = run_cli(path, out)
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith(f"moefy plot: error: {path}"), stderr[:300]
    assert "Traceback" not in stderr


# ------------------------------------------------------------------------------------------ hypothesis
garbage = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10 ** 400, max_value=10 ** 400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 5e-324, 2 ** 53 + 1])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
fields = st.sampled_from(["epoch", "routing_acc", "entropy", "utilization", "metrics", "hole", "dropped",
                          "affinity", "layers"])
# what users report: string epochs, list entropies, NaN / Infinity tokens, numbers no float holds, odd names
extremes = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 10 ** 400, -(10 ** 400), -1,
                            2 ** 53 + 1, "1", [1.0], {"a": [None]}, "$\\frac$", "\ud800", "\u2028", True])


@st.composite
def log_text(draw) -> bytes:
    """A log that is mostly right: valid lines, some of them damaged (a field garbled or dropped, a
    unicode key added, the line cut short, replaced by random text or bytes), random line ends, BOM and
    blank lines."""
    columns = draw(st.integers(1, 4))
    layered = draw(st.booleans())
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=2, unique=True))
    out = []
    for epoch in range(1, draw(st.integers(1, 3)) + 1):
        entry = good(epoch, columns, metrics={draw(st.text(max_size=6)): draw(st.floats(-10, 10))},
                     affinity=[[draw(st.integers(0, 9))] * columns])
        if layered:
            entry["layers"] = [good(epoch, columns, layer=n) for n in names]
        for _ in range(draw(st.integers(0, 1)) * draw(st.integers(1, 3))):
            inner = entry.get("layers")
            inner = inner[0] if isinstance(inner, list) and inner and isinstance(inner[0], dict) else None
            target = inner if inner is not None and draw(st.booleans()) else entry
            field = draw(fields)
            how = draw(st.sampled_from(["garble", "extreme", "extreme", "extreme", "drop", "key"]))
            if how == "extreme":
                value = draw(extremes)
                if field in ("utilization", "affinity") and draw(st.booleans()):
                    value = [value] * columns if field == "utilization" else [[value] * columns]
                elif field in ("metrics", "layers") and draw(st.booleans()):
                    value = {draw(extremes.filter(lambda v: isinstance(v, str))): value} if field == "metrics" \
                        else [good(epoch, columns, layer=value)]
                target[field] = value
            elif how == "garble":
                target[field] = draw(garbage)
            elif how == "drop":
                target.pop(field, None)
            else:
                target[draw(st.text(min_size=1, max_size=5))] = draw(garbage)
        line = json.dumps(entry, ensure_ascii=draw(st.booleans()))  # NaN / Infinity tokens for non-finite floats
        form = draw(st.sampled_from(["json"] * 6 + ["cut", "text", "bytes", "blank"]))
        if form == "cut":
            line = line[:draw(st.integers(0, len(line)))]
        elif form == "text":
            line = draw(st.text(max_size=30))
        elif form == "blank":
            line = draw(st.sampled_from(["", " ", "\t", "\r", " \r"]))
        data = draw(st.binary(max_size=12)) if form == "bytes" else line.encode("utf-8", "surrogatepass")
        out.append(data)
    text = draw(st.sampled_from([b"\n", b"\r\n"])).join(out)
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text + (b"\n" if draw(st.booleans()) else b"")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=log_text())
def test_fuzzed_logs_parse_or_name_the_line(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    path = folder / "log.jsonl"
    path.write_bytes(text)
    if check_outcome(path, text) is None:
        assert_cli_rejects(path, folder / "plots")


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=EXAMPLES <= 200)
@given(text=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_never_crash_the_parser(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("bytes", numbered=True) / "log.jsonl"
    path.write_bytes(text)
    check_outcome(path, text)


# ------------------------------------------------------------------------------------------ hand cases
DEEP = '{"epoch": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
BAD = [  # (name, file bytes, line the error names (None: the whole file), message regex)
    ("empty", b"", None, r"the log is empty"),
    ("only BOM and blanks", b"\xef\xbb\xbf\n \r\n\t\n", None, r"the log is empty"),
    ("string epoch", lines(good(epoch="1")), 1, r"'epoch' must be an int in \[0, 2\*\*53\], got '1'"),
    ("float epoch", lines(good(epoch=1.0)), 1, r"'epoch' must be an int"),
    ("bool epoch", lines(good(epoch=True)), 1, r"'epoch' must be an int"),
    ("10**400 epoch", lines(good(epoch=10 ** 400)), 1, r"'epoch' must be an int .*got 1000.* \.\.\.$"),
    ("2**53 + 1 epoch", lines(good(epoch=2 ** 53 + 1)), 1, r"'epoch' must be an int in \[0, 2\*\*53\]"),
    ("list entropy", lines(good(), good(2, entropy=[1.0])), 2, r"'entropy' must be a number in \[0, 1e300\]"),
    ("NaN entropy", lines(good(entropy=float("nan"))), 1, r"'entropy' must be a number .*got nan"),
    ("Infinity metric", lines(good(metrics={"loss": float("inf")})), 1, r"metric 'loss' must be a number"),
    ("-Infinity utilization", lines(good(utilization=[float("-inf"), 1.0])), 1, r"'utilization' must be"),
    ("1e308 metric", lines(good(metrics={"loss": 1e308})), 1, r"metric 'loss' must be a number \(finite, \|v\| <= 1e300\)"),
    ("10**400 utilization", lines(good(utilization=[10 ** 400, 0])), 1, r"'utilization' must be .*got \[1000"),
    ("5000-digit int", b'{"epoch": ' + b"9" * 5000 + b"}\n", 1, r"not valid JSON \(Exceeds the limit"),
    ("deep nesting", lines(good(), DEEP), 2, r"not valid JSON \(maximum recursion depth"),
    ("nested garbage metrics", lines(good(metrics={"loss": {"a": [1, {"b": None}]}})), 1, r"metric 'loss'"),
    ("metrics a list", lines(good(metrics=[1, 2])), 1, r"'metrics' must be an object"),
    ("utilization an object", lines(good(utilization={"0": 1})), 1, r"'utilization' must be"),
    ("layers garbage", lines(good(layers=[1, "a"])), 1, r"'layers' must be a non-empty list of objects"),
    ("layer name not a string", lines(good(layers=[good(layer=7)])), 1, r"layers\[0\] needs a non-empty string"),
    ("lone surrogate layer name", lines(good(layers=[good(layer="\ud800")])), 1, r"valid Unicode"),
    ("lone surrogate metric name", lines(good(metrics={"\udfffx": 1.0})), 1, r"metric name .* valid Unicode"),
    ("hole a string", lines(good(hole="yes")), 1, r"'hole' must be true or false, got 'yes'"),
    ("top-level array", lines(good(), "[1, 2]"), 2, r"expected a JSON object, got list"),
    ("top-level string", lines('"epoch"'), 1, r"expected a JSON object, got str"),
    ("cut line ended by a newline", lines(good()) + b'{"epoch": 2, "routing\n', 2, r"not valid JSON"),
    ("cut line before the last", lines(good(), '{"epoch": 2, "rout', good(3)), 2, r"not valid JSON"),
    ("only a torn line", b'{"epoch": 1, "routing', 1, r"not valid JSON .*no complete line before it"),
    ("torn line after blank lines only", b"\n \n" + b'{"epoch": 1', 3, r"no complete line before it"),
    ("bad UTF-8 inside a last line", lines(good()) + b'{"epoch": 2, "x": "\xff"', 2, r"not valid UTF-8"),
    ("last line complete JSON but bad", lines(good()) + b'{"epoch": 2}', 2, r"missing field 'routing_acc'"),
    ("invalid UTF-8", lines(good()) + b'{"epoch": 2, "x": "\xff\xfe"}\n', 2, r"not valid UTF-8 \(byte 0xff at column 20\)"),
    ("NUL byte", lines(good()) + b'\x00{"epoch": 2}\n', 2, r"not valid JSON"),
    ("blank lines keep the count", lines(good(), "", "  ", good(2, utilization=[1.0])), 4, r"has 1 values"),
    ("CRLF keeps the count", lines(good(), good(2), good(2), end="\r\n"), 3, r"epoch 2 does not increase"),
    ("very long bad line", lines(good(), good(2, utilization=[0.5] * 200_000 + ["x"])), 2,
     r"'utilization' must be .*\.\.\.$"),
    ("very long garbage line", lines(good(), "x" * 1_000_000), 2, r"not valid JSON \(Expecting value at column 1\)"),
]


@pytest.mark.parametrize("name,text,line,message", BAD, ids=[c[0] for c in BAD])
def test_bad_logs_name_the_line(tmp_path, name, text, line, message):
    path = tmp_path / "log.jsonl"
    path.write_bytes(text)
    with pytest.raises(LogFormatError, match=message) as err:
        read_log(path)
    assert err.value.line == line
    assert check_outcome(path, text) is None
    assert_cli_rejects(path, tmp_path / "plots")


UNICODE = {"layer": "块.0/专家 $\\frac$ 🙂", "metric": "损失 \u2028 $$ \x00 é"}
GOOD = [  # (name, file bytes, epochs)
    ("BOM", b"\xef\xbb\xbf" + lines(good(), good(2)), [1, 2]),
    ("CRLF and blank lines", lines(good(), "", " \t", good(3), end="\r\n"), [1, 3]),
    ("no final newline", lines(good())[:-1], [1]),
    ("unicode names and raw U+2028", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in [
        good(1, metrics={UNICODE["metric"]: 1.0}, affinity=[[1, 2]],
             layers=[good(1, layer=UNICODE["layer"], affinity=[[1, 2]]), good(1, layer="b", affinity=[[3, 1]])]),
        good(2, metrics={UNICODE["metric"]: None}, layers=[good(2, layer=UNICODE["layer"]), good(2, layer="b")])]
    ).encode("utf-8"), [1, 2]),
    ("numbers at the bounds", lines(
        good(0, entropy=1e300, utilization=[1e300, 0], metrics={"loss": 1e300, "tiny": 5e-324}, dropped=1,
             affinity=[[1e300, 1e300], [0, 0]]),
        good(2 ** 53, routing_acc=None, entropy=0, utilization=[0, 10 ** 299], metrics={"loss": -1e300})), [0, 2 ** 53]),
    ("very long whitespace and duplicate keys", b'{"epoch": 5,' + b" " * 1_000_000 + b'"epoch": 1, "routing_acc": 1,'
     b' "entropy": 0, "utilization": [1]}\n', [1]),
]


@pytest.mark.parametrize("name,text,epochs", GOOD, ids=[c[0] for c in GOOD])
def test_odd_but_valid_logs_parse_and_plot(tmp_path, name, text, epochs):
    path = tmp_path / "log.jsonl"
    path.write_bytes(text)
    log = check_outcome(path, text)
    assert log is not None and log.epochs == epochs
    code, stdout, stderr = run_cli(path, tmp_path / "plots")
    assert code == 0 and "Traceback" not in stderr and "error" not in stderr, stderr[:300]
    assert (tmp_path / "plots" / "dashboard.png").stat().st_size > 0
    assert str(tmp_path / "plots" / "dashboard.png") in stdout.splitlines()


def test_unicode_names_survive(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(dict((c[0], c[1]) for c in GOOD)["unicode names and raw U+2028"])
    log = read_log(path)
    assert list(log.layers) == [UNICODE["layer"], "b"] and log.metrics == {UNICODE["metric"]: [1.0, None]}
    code, _, _ = run_cli(path, tmp_path / "plots")
    csvs = sorted(p.name for p in (tmp_path / "plots").glob("affinity_*.csv"))
    assert code == 0 and csvs == sorted(["affinity_b.csv", f"affinity_{safe_name(UNICODE['layer'])}.csv"])


def test_cli_subprocess_on_a_fuzzed_log(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(lines(good()) + b'{"epoch": ' + b"9" * 5000 + b"}\n")
    proc = subprocess.run([sys.executable, "-m", "moefy.observe.cli", "plot", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"moefy plot: error: {path}:2: not valid JSON")
