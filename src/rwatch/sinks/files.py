"""Atomic file replacement for the projections that write a file (prom_sd's file_sd, the Ansible inventory).

A reader (Prometheus on inotify, ansible-inventory at any moment) must never see half a file: the content goes to a
temp file in the same directory, fsynced, renamed over the old one, and the directory fsynced after it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# Prometheus and Ansible run as another user more often than not: the file must be readable by them (mkstemp
# makes 0600).
FILE_MODE = 0o644


def replace_file(path: Path, content: bytes, *, compare: bool = False) -> bool:
    """Atomically make ``path`` hold ``content``; False when ``compare`` found it already did.

    Temp file in the same directory (os.replace is atomic only within one file system), fsynced before the
    rename and the directory fsynced after it, so a crash leaves the old file or the new one, never a mix.
    """
    if compare:
        with contextlib.suppress(OSError):
            if path.read_bytes() == content:
                return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
