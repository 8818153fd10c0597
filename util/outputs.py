"""Writing a run folder's files safely: never through a symbolic link, never half-written, no stale temp files.

A run folder may be shared, copied or tampered with. A file of ours that has become a symbolic link (``log.txt``
pointing at ``~/.bashrc``) must not have its target changed: whole files are replaced by a rename
(``util.checkpoint.atomic_write``), which replaces the link itself, and appended files are opened with
``O_NOFOLLOW`` after the link is removed. Temp files of a killed writer (``.<name>.<random>.tmp``, the pattern of
``atomic_write``) are removed when a run starts.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import IO

from util.checkpoint import atomic_write

logger = logging.getLogger("vitfreeze")

__all__ = ["append_text", "clean_temp_files", "open_append", "replace_link", "write_text", "disk_full_message"]


def replace_link(path: str | Path) -> Path:
    """If ``path`` is a symbolic link, remove the link (its target stays as it is) and say so."""
    path = Path(path)
    if path.is_symlink():
        logger.warning("%s is a symbolic link (to %s): replacing the link with a file of this run; its target is "
                       "left alone", path, os.readlink(path))
        path.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Create or replace ``path`` with ``text`` atomically; a link at ``path`` is replaced, never written through."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def open_append(path: str | Path) -> IO[str]:
    """``open(path, 'a')`` that never follows a symbolic link at ``path`` (the link is replaced first)."""
    path = replace_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, "a")


def append_text(path: str | Path, text: str) -> None:
    with open_append(path) as handle:
        handle.write(text)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files that a killed ``atomic_write`` left in ``folder`` and its sub-folders (checkpoints,
    pictures, logs: ``.<name>.<random>.tmp``). Folders and links of that name are left alone (a link is removed,
    never followed). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp"):
        if path.is_symlink() or path.is_file():
            logger.warning("removing %s, a partial file left by a killed run", path)
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def disk_full_message(err: BaseException, folder: str | Path) -> str | None:
    """One line for an out-of-space error while writing into ``folder`` (None for any other error). torch.save
    reports a full disk as ``RuntimeError`` (``basic_ios::clear: iostream error`` / ``unexpected pos``)."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    full = full or (isinstance(err, RuntimeError) and ("iostream error" in text or "unexpected pos" in text
                                                       or "No space left" in text))
    if not full:
        return None
    return (f"cannot write into {folder}: no space left on the device (or quota exceeded); free space there or "
            f"choose another --output_dir; the files already there are left as they were")
