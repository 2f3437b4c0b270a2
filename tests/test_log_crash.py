"""A training log that survives a crash (issue 23, item 8).

A run killed in the middle of ``TrainingLogWriter.write`` leaves a prefix of its last line: ``read_log`` and
``moefy plot`` keep every complete epoch before it (with a logged warning), appending cuts the torn tail off,
and the writer refuses every line its own reader would refuse after the lines already in the file, also after
a restart with ``mode="a"``.
"""
import errno
import json
import logging
import os

import pytest

from moefy.observe.cli import main
from moefy.observe.log import LogFormatError, TrainingLogWriter, log_entry, read_log


def layer(name="m", columns=2, hole=False, null_columns=None, affinity=None):
    summary = {"layer": name, "routing_acc": 0.5, "entropy": 0.6, "utilization": [1 / columns] * columns,
               "hole": hole, "dropped": 0.0}
    if null_columns:
        summary["null_columns"] = null_columns
    if affinity is not None:
        summary["affinity"] = affinity
    return summary


def write_log(path, epochs=(1, 2, 3), **kw):
    with TrainingLogWriter(path) as writer:
        for epoch in epochs:
            writer.write(epoch, [layer(affinity=[[epoch, 1], [2, epoch]], **kw)], {"loss": 1 / epoch})
    return path.read_bytes()


def torn_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "torn" in r.getMessage()]


def test_every_cut_of_the_last_line_keeps_the_complete_epochs(tmp_path, caplog):
    """Cut the 4th line after each of its bytes (what a kill mid-write leaves): the 3 complete epochs stay,
    exactly as read from a log that never had the 4th line, with a warning naming line 4."""
    complete = write_log(tmp_path / "full.jsonl")
    fourth = (json.dumps(log_entry(4, [layer(affinity=[[4, 1], [2, 4]])], {"loss": 0.25})) + "\n").encode()
    want = read_log(tmp_path / "full.jsonl")
    path = tmp_path / "torn.jsonl"
    for cut in range(1, len(fourth) - 1):  # fourth[:-1] parses: a complete line that lost only its "\n"
        path.write_bytes(complete + fourth[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moefy"):
            log = read_log(path)
        assert (log.epochs, log.metrics, log.layers, log.torn_line) == (want.epochs, want.metrics, want.layers, 4)
        warned, = torn_warnings(caplog)
        assert warned.startswith(f"{path}:4: skipped the torn last line ({cut} bytes without a newline")
        assert "kept the 3 epochs" in warned
    path.write_bytes(complete + fourth[:-1])
    assert read_log(path).epochs == [1, 2, 3, 4] and read_log(path).torn_line is None


def test_a_torn_multibyte_character_is_a_torn_line(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    line = json.dumps(log_entry(2, [layer()], {"损失": 1.0}), ensure_ascii=False).encode()
    cut = line.index("损".encode()) + 1  # inside the 3 bytes of one character
    path.write_bytes(write_log(path, epochs=(1,)) + line[:cut])
    with caplog.at_level(logging.WARNING, logger="moefy"):
        assert read_log(path).epochs == [1]
    assert "a UTF-8 character cut short" in torn_warnings(caplog)[0]


def test_plot_draws_every_complete_epoch_of_a_torn_log(tmp_path, caplog, capsys):
    path = tmp_path / "log.jsonl"
    path.write_bytes(write_log(path) + b'{"epoch": 4, "routing_acc": 0.5, "entr')
    with caplog.at_level(logging.WARNING, logger="moefy"):
        assert main(["plot", str(path), "--out", str(tmp_path / "plots"), "--dpi", "20"]) == 0
    assert torn_warnings(caplog) and "error" not in capsys.readouterr().err
    rows = (tmp_path / "plots" / "affinity.csv").read_text().splitlines()
    assert rows[1:] == ["0,0.750000,0.250000,4", "1,0.400000,0.600000,5"]  # epoch 3's [[3, 1], [2, 3]]


def test_append_after_a_torn_line_cuts_it_off(tmp_path, caplog):
    """The file after a crash and a restart is byte for byte the file of a run that never crashed."""
    clean = write_log(tmp_path / "clean.jsonl", epochs=(1, 2, 3))
    path = tmp_path / "log.jsonl"
    path.write_bytes(write_log(path, epochs=(1, 2)) + b'{"epoch": 3, "routing_acc": 0.')
    with caplog.at_level(logging.WARNING, logger="moefy"):
        writer = TrainingLogWriter(path, mode="a")
    assert f"{path}:3: cut off the torn last line (30 bytes" in torn_warnings(caplog)[0]
    with writer:
        assert writer.last_epoch == 2
        writer.write(3, [layer(affinity=[[3, 1], [2, 3]])], {"loss": 1 / 3})
    assert path.read_bytes() == clean
    assert read_log(path).epochs == [1, 2, 3]


def test_append_after_a_complete_line_without_newline_starts_a_new_line(tmp_path):
    clean = write_log(tmp_path / "clean.jsonl", epochs=(1, 2))
    path = tmp_path / "log.jsonl"
    path.write_bytes(write_log(path, epochs=(1,))[:-1])
    with TrainingLogWriter(path, mode="a") as writer:
        writer.write(2, [layer(affinity=[[2, 1], [2, 2]])], {"loss": 0.5})
    assert path.read_bytes() == clean


def test_restart_with_mode_a_continues_the_epochs(tmp_path):
    path = tmp_path / "log.jsonl"
    before = write_log(path, epochs=(1, 2))
    with TrainingLogWriter(path, mode="a") as writer:
        assert writer.last_epoch == 2
        for epoch in (1, 2):  # a restart that counts from 1 again
            with pytest.raises(LogFormatError, match=rf":3: epoch {epoch} does not increase \(previous line has "
                                                     rf"epoch 2\); a restarted run continues at "
                                                     rf"writer.last_epoch \+ 1 = 3$"):
                writer.write(epoch, [layer()])
        assert path.read_bytes() == before
        writer.write(writer.last_epoch + 1, [layer()])
    assert read_log(path).epochs == [1, 2, 3]


def test_append_refuses_a_log_its_reader_refuses(tmp_path):
    path = tmp_path / "log.jsonl"
    good = write_log(path, epochs=(1,))
    path.write_bytes(good + b'{"epoch": 2, "routing\n' + good)
    with pytest.raises(LogFormatError, match=r":2: not valid JSON .*\(mode='a' appends only to a log that "
                                             r"read_log accepts\)"):
        TrainingLogWriter(path, mode="a")
    assert path.read_bytes() == good + b'{"epoch": 2, "routing\n' + good


# (what changes on the 2nd line, the 2nd write's arguments, the error) for a log whose 1st line is epoch 1,
# layers "a" and "b" with 3 columns, the second with a hole and a null column
TWO = [layer("a", 3), layer("b", 3, hole=True, null_columns=["zero"])]
CHANGES = {
    "repeated epoch": ((1, TWO), r"epoch 1 does not increase \(previous line has epoch 1\)"),
    "decreasing epoch": ((0, TWO), r"epoch 0 does not increase"),
    "more columns": ((2, [layer("a", 4), TWO[1]]), r"'utilization' has 4 values but the first line has 3"),
    "fewer columns in a layer": ((2, [TWO[0], layer("b", 2, hole=True)]),
                                 r"layers\[1\] \('b'\): 'utilization' has 2 values but the first line has 3"),
    "a layer more": ((2, TWO + [layer("c", 3)]), r"'layers' names \['a', 'b', 'c'\] differ from the first"),
    "a layer renamed": ((2, [TWO[0], dict(TWO[1], layer="c")]), r"'layers' names \['a', 'c'\] differ"),
    "one layer left": ((2, [TWO[0]]), r"missing field 'layers' \(the first line has per-layer fields\)"),
    "hole dropped": ((2, [TWO[0], dict(TWO[1], hole=False, null_columns=["zero", "copy"])]),
                     r"layers\[1\] \('b'\): 'hole' is False but the first line has True"),
    "null kinds changed": ((2, [TWO[0], dict(TWO[1], null_columns=["copy"])]),
                           r"layers\[1\] \('b'\): 'null_columns' is \['copy'\] but the first line has \['zero'\]"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_writer_refuses_what_its_reader_refuses(tmp_path, change):
    """The writer refuses the line (naming the field) and writes nothing; the same line appended by hand
    makes read_log fail with the same message."""
    (epoch, layers), message = CHANGES[change]
    path = tmp_path / "log.jsonl"
    with TrainingLogWriter(path) as writer:
        writer.write(1, TWO)
        before = path.read_bytes()
        with pytest.raises(LogFormatError, match=f":2: {message}") as refused:
            writer.write(epoch, layers)
        assert path.read_bytes() == before
        writer.write(2, TWO)  # the writer goes on
    with TrainingLogWriter(path, mode="a") as writer:  # a writer that resumes the file refuses it too
        with pytest.raises(LogFormatError, match=":3: ") as resumed:
            writer.write(epoch, layers)
    if "epoch" not in change:
        assert resumed.value.message == refused.value.message
    assert read_log(path).epochs == [1, 2]
    path.write_bytes(before + (json.dumps(log_entry(epoch, layers)) + "\n").encode())
    with pytest.raises(LogFormatError) as read_refused:
        read_log(path)
    assert read_refused.value.message == refused.value.message.split("; a restarted run")[0]


def test_a_full_disk_mid_line_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    real_write = os.write

    def half_then_enospc(fd, data):
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with TrainingLogWriter(path) as writer:
        writer.write(1, [layer()])
        before = path.read_bytes()
        monkeypatch.setattr(os, "write", half_then_enospc)
        with pytest.raises(OSError, match="No space left"):
            writer.write(2, [layer()])
        monkeypatch.setattr(os, "write", real_write)
        assert path.read_bytes() == before
        writer.write(2, [layer()])
    assert read_log(path).epochs == [1, 2]
