"""Crash-safe writes of several files into one folder, as trusted checkpoint writers do.

Every file is written under a temporary name in the folder (``.<name>.moefy-tmp-<token>``) and fsynced; then the
stale files are removed, the files are renamed into place (``os.replace``: atomic on POSIX and Windows) and the
folder is fsynced, the commit record last. A kill or an ``OSError`` before that last rename leaves every earlier
file of the folder's previous commit record untouched or detectably replaced (the record names what it commits),
and the temporary files for the next save to remove.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Callable, Iterable, List, Tuple

logger = logging.getLogger(__name__)

TEMP_MARK = ".moefy-tmp-"


# safetensors' save_file writes through a temporary file of its own in the target's folder (Rust's tempfile:
# ".tmp" + 6 letters or digits) and renames it: a save killed inside save_file leaves one behind
SAFETENSORS_TEMP = re.compile(r"\.tmp[0-9A-Za-z]{6}")


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of a save (one that was interrupted, if no save is running): moefy's own
    or safetensors'."""
    return name.startswith(".") and TEMP_MARK in name or SAFETENSORS_TEMP.fullmatch(name) is not None


def fsync_dir(folder) -> None:
    """Make the folder's entries (renames, removals) durable; a no-op where folders cannot be opened (Windows)."""
    if os.name == "nt":  # a folder cannot be opened on Windows; its renames are durable through NTFS's journal
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    """fsync a file that a library wrote and closed (``fsync`` flushes the file, whichever descriptor asks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderWrite:
    """One save into ``folder``: :meth:`add` writes each file under a temporary name, :meth:`commit` renames them
    into place, the commit record last. Used as a context manager, an exception removes the temporary files."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self.token = uuid.uuid4().hex[:16]
        self.pending: List[Tuple[str, str]] = []  # (temporary path, final name), in the order they were added

    def add(self, name: str, write: Callable[[str], None]) -> str:
        """Write the file ``name`` with ``write(path)`` at a temporary path, fsync it; the temporary path."""
        tmp = os.path.join(self.folder, f".{name}{TEMP_MARK}{self.token}")
        self.pending.append((tmp, name))
        write(tmp)
        fsync_file(tmp)
        return tmp

    def add_bytes(self, name: str, data: bytes) -> str:
        def write(path):
            with open(path, "wb") as f:
                f.write(data)
        return self.add(name, write)

    def commit(self, remove: Iterable[str] = ()) -> None:
        """Remove the files ``remove`` (stale ones another loader would pick up), then rename every added file into
        place in order (the last added is the commit record), fsyncing the folder after each step."""
        removed = False
        for name in remove:
            try:
                os.unlink(os.path.join(self.folder, name))
                removed = True
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.folder)
        *files, (record_tmp, record) = self.pending
        for tmp, name in files:
            os.replace(tmp, os.path.join(self.folder, name))
        if files:
            fsync_dir(self.folder)
        os.replace(record_tmp, os.path.join(self.folder, record))
        self.pending = []
        fsync_dir(self.folder)

    def abort(self) -> None:
        """Remove the temporary files not renamed yet (best effort: the next save removes what is left)."""
        for tmp, _ in self.pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.pending = []

    def __enter__(self) -> "FolderWrite":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()


def remove_files(folder, names: Iterable[str]) -> None:
    """Remove ``names`` from ``folder`` where present (after a commit: files no record names any more)."""
    removed = False
    for name in names:
        try:
            os.unlink(os.path.join(folder, name))
            removed = True
        except FileNotFoundError:
            pass
    if removed:
        fsync_dir(folder)
